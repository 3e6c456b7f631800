"""Starting and stopping the actors of every stage: rollout engines, reward workers, the learner
group and the weight sync between them, from the run's config (the only module that does)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import ray

from learner.group import LearnerGroup
from learner.objectives import GRPOObjective
from orchestration.cluster.placement import Placement, extra_rollout_slot
from orchestration.cluster.pools import RewardPool, RolloutPool
from orchestration.cluster.weight_sync import WeightSync
from orchestration.config.gpu_layout import sync_backend
from orchestration.config.recipe import reward_settings


@dataclass
class Actors:
    rollout: RolloutPool
    rewards: RewardPool
    learner: LearnerGroup
    sync: WeightSync
    colocated: bool = False  # engine i and learner rank i share a device

    def to_learner(self) -> None:
        """Colocated: the engines sleep and the learner takes the device back (no-op otherwise)."""
        if self.colocated:
            ray.get(self.rollout.call("sleep"))
            self.learner.reload()

    @contextmanager
    def handover(self) -> Iterator[None]:
        """Colocated: engines take their weights back for the sync; then the learner leaves the
        device and the engines rebuild their KV cache."""
        if self.colocated:
            ray.get(self.rollout.call("wake_up", ["weights"]))
        yield
        if self.colocated:
            self.learner.offload()
            ray.get(self.rollout.call("wake_up", ["kv_cache"]))


def engine_dtype(cfg: Any) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if cfg.topology.rollout_gpus > 0 else "float32"


def start_rollout(cfg: Any, placement: Placement) -> RolloutPool:
    """The engines; each resolves `model.path` on its own node."""
    r = cfg.rollout
    return RolloutPool.start(placement.options["rollout"], cfg.model.path, r.timeout_s, placement.engine_bundles,
                             more=extra_rollout_slot(cfg),  # placement for engines added during the run
                             gpu=cfg.topology.rollout_gpus > 0, colocated=cfg.topology.colocate,
                             dtype=engine_dtype(cfg), seed=cfg.seed,
                             max_model_len=cfg.model.max_model_len, max_prompt_tokens=r.max_prompt_tokens,
                             tensor_parallel_size=r.tensor_parallel_size,
                             gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gb=r.kv_cache_gb)


def start_learner(cfg: Any, placement: Placement, model_path: str, objective: Any, total_steps: int,
                  **extra: Any) -> LearnerGroup:
    """The learner group on `model_path` with `learner.*` settings; `extra`: the stage's own."""
    l = cfg.learner
    return LearnerGroup(
        l.num_ranks, placement.options["learner"], model_path=model_path, objective=objective, lr=l.lr,
        betas=tuple(l.betas), weight_decay=l.weight_decay, warmup_steps=l.warmup_steps, schedule=l.schedule,
        total_steps=total_steps, grad_clip=l.grad_clip, micro_batch_tokens=l.micro_batch_tokens,
        mixed_precision=l.mixed_precision, gradient_checkpointing=cfg.model.gradient_checkpointing, seed=cfg.seed,
        cpu_threads=max(1, int(cfg.topology.learner_cpus)), logits_chunk=l.logits_chunk_tokens,
        share_prompts=l.share_prompts, **extra)


def start_actors(cfg: Any, placement: Placement) -> Actors:
    r, l, a = cfg.rollout, cfg.learner, cfg.algo
    rollout = start_rollout(cfg, placement)
    if cfg.topology.colocate:
        ray.get(rollout.call("sleep"))  # the learner loads onto the shared devices next
    rewards = RewardPool(placement.options["reward"], cfg.reward.functions, cfg.reward.timeout_s, reward_settings(cfg),
                         pass_env(cfg))
    kl_in_loss = a.kl_coef if a.kl_in == "loss" else 0.0
    objective = GRPOObjective(loss=a.loss, clip_low=a.clip_low, clip_high=a.clip_high, agg=a.loss_agg,
                              max_tokens=r.max_new_tokens, kl_coef=kl_in_loss, kl_estimator=a.kl_estimator,
                              entropy_coef=a.entropy_coef, is_cap=a.is_cap,
                              off_policy=a.old_logprobs if r.max_staleness > 0 else "")
    learner = start_learner(cfg, placement, cfg.model.path, objective, cfg.steps, num_minibatches=l.num_minibatches,
                            temperature=r.temperature, reference=a.kl_in == "reward" and a.kl_coef > 0)
    sync = WeightSync(learner, rollout, backend=sync_backend(cfg), dtype=engine_dtype(cfg), bucket_mb=cfg.sync.bucket_mb,
                      timeout_s=cfg.sync.timeout_s, workers_per_engine=r.tensor_parallel_size)
    sync.connect()
    if cfg.topology.colocate:
        learner.offload()  # the engines generate first
        ray.get(rollout.call("wake_up"))
    return Actors(rollout, rewards, learner, sync, colocated=cfg.topology.colocate)


def pass_env(cfg: Any) -> tuple[str, ...]:
    """The environment variables a run's reward functions may see beyond the allowlist."""
    return tuple(cfg.reward.pass_env)
