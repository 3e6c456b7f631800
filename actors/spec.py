"""EngineSpec: what one rollout engine is started with (no Ray, no vLLM, no torch).

Built once from the run's config by `orchestration.cluster.launch`; the rollout pool's launcher
gives each placement slot its own copy (`dataclasses.replace`: seed + slot, the slot's bundles),
and `actors.rollout.RolloutActor` is constructed from it. A frozen dataclass, so Ray pickles it
and no actor changes what the others were told.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envs import EnvSpec


@dataclass(frozen=True)
class EngineSpec:
    model: str  # `model.path`: resolved by the engine on its own node (`common.models.resolve_on_node`)
    gpu: bool = False  # the engine runs on GPUs (else vLLM's CPU build)
    colocated: bool = False  # shares its GPU with a learner rank and sleeps while it trains (GPU only)
    dtype: str = "float32"  # the engine's weights and compute (`launch.engine_dtype`)
    seed: int = 0  # the engine's own seed (a pool's engine in slot i gets the run's seed + i)
    max_model_len: int = 1024  # prompt + completion tokens per sequence
    max_prompt_tokens: int = 256  # longer prompts are dropped, not truncated
    tensor_parallel_size: int = 1  # GPUs (vLLM workers) per engine
    gpu_memory_utilization: float = 0.5  # vLLM's share of each GPU's memory
    kv_cache_gb: int = 1  # vLLM-CPU's KV cache size
    # With tensor parallelism, the bundles of this engine's own placement group that vLLM's Ray
    # executor puts one worker each on (set per slot by the pool's launcher; () for TP 1).
    engine_bundles: tuple[int, ...] = ()
    env: EnvSpec = field(default_factory=EnvSpec)  # multi-turn rollouts (`env.*`); the default: one reply
    lora_rank: int = 0  # > 0: vLLM's LoRA on (`max_lora_rank`); the sync then loads an adapter (`learner.lora`)
