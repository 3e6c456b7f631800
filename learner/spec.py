"""LearnerSpec: what every learner rank is set up with (torch-free, so it imports fast).

Built once from the run's config by `orchestration.cluster.launch` (or by a test or a bench) and
passed whole, through `learner.group.LearnerGroup`, to every rank's `LearnerWorker.setup`. A
frozen dataclass, so Ray pickles it and the driver can read what the ranks were told
(`LearnerGroup.spec`). The defaults are the worker's own; a run's come from `learner.*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoRASpec:
    """`learner.lora.*` as the ranks apply it (see orchestration/config/lora.py for each field)."""
    rank: int = 0  # 0: no LoRA (full fine-tuning)
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)
    init: str = "default"  # default | gaussian | orthogonal (each leaves the model's output unchanged)
    sync: str = "merged"  # what a weight sync sends: merged (base + scale·BA, base names) | adapter (A, B alone)

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class LearnerSpec:
    model_path: str  # the policy to train: a path or model name, resolved by each rank on its node
    objective: Any  # what the ranks minimise (`learner.objectives`); it says whether a reference model is loaded
    lr: float  # the AdamW learning rate (after warmup)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    weight_decay: float = 0.0  # AdamW's
    warmup_steps: int = 0  # optimizer steps of linear warmup
    schedule: str = "constant"  # after warmup: "constant" | "cosine" (down to 0.1 × lr at the last step)
    total_steps: int = 1  # train steps of the run (the cosine schedule's length, × num_minibatches)
    grad_clip: float = 1.0  # gradient-norm clip (0: none)
    micro_batch_tokens: int = 4096  # token budget of one micro-batch (rows × longest row)
    num_minibatches: int = 1  # optimizer steps per train step (each on an equal share of the batch)
    temperature: float = 1.0  # the sampling temperature the logits are divided by (as the engines do)
    mixed_precision: bool = True  # bf16 compute, fp32 reductions (GPU only; CPU always runs fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more compute)
    seed: int = 0  # torch's seed on every rank
    cpu_threads: int = 1  # torch threads per rank on CPU
    logits_chunk: int = 0  # positions whose fp32 log-softmax is computed at once (0: all at once)
    share_prompts: bool = False  # one packed row per prompt group (see `learner.batch.pack`) where attention allows
    lora: LoRASpec = LoRASpec()  # rank > 0: train peft LoRA adapters on the frozen policy (`learner.lora`)
