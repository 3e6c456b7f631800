"""GPU layouts that cannot work, rejected before any actor starts (called by `config.validate`).

Each NCCL rank needs a whole GPU of its own (two ranks of one communicator on a GPU fail with
"Duplicate GPU detected"), a tensor-parallel engine needs TP GPUs, engines sharing a GPU must fit
in it together, and colocated engine/learner pairs share one GPU each.
"""

from __future__ import annotations

from typing import Any

from common.errors import ConfigError, check


def validate_gpus(cfg: Any) -> None:
    """GPU topologies that cannot work: each NCCL rank needs a whole GPU of its own (two ranks of one
    communicator on a GPU fail with "Duplicate GPU detected"), a TP engine needs TP GPUs, and engines
    sharing a GPU must fit in it together."""
    t, r = cfg.topology, cfg.rollout
    tp, gpus = r.tensor_parallel_size, t.rollout_gpus
    check(tp >= 1, f"rollout.tensor_parallel_size must be >= 1, got {tp}")
    check(sync_backend(cfg) != "shared" or t.colocate, "sync.backend=shared needs topology.colocate=true")
    if t.colocate:
        validate_colocation(cfg)
        return
    check(t.learner_gpus in (0, 1), f"topology.learner_gpus must be 0 or 1 (one whole GPU per learner rank: "
                                     f"an NCCL rank cannot share or span GPUs), got {t.learner_gpus:g}")
    check(tp == 1 or gpus == tp, f"rollout.tensor_parallel_size={tp} needs topology.rollout_gpus={tp} "
                                  f"(one GPU per tensor-parallel worker), got {gpus:g}")
    check(gpus == 0 or tp > 1 or gpus <= 1, f"topology.rollout_gpus ({gpus:g}) > 1 needs "
                                             f"rollout.tensor_parallel_size={gpus:g}")
    backend = sync_backend(cfg)
    if backend == "nccl":
        check(gpus > 0 and t.learner_gpus > 0, "sync.backend=nccl needs GPUs on both sides (topology.rollout_gpus "
                                               "and topology.learner_gpus); use sync.backend=gloo otherwise")
        check(gpus == int(gpus), f"topology.rollout_gpus={gpus:g}: engines that share a GPU cannot all join an "
                                  f"NCCL weight broadcast (one rank per GPU); use whole GPUs or sync.backend=gloo")
    elif cfg.sync.backend == "auto" and (gpus > 0) != (t.learner_gpus > 0):
        side = "rollout" if gpus > 0 else "learner"
        raise ConfigError(f"only the {side} side has GPUs, so sync.backend=auto cannot use NCCL: set "
                          f"sync.backend=gloo (a CPU broadcast: slow for large models) or give both sides GPUs")
    if 0 < gpus < 1:
        per_gpu = int(1 / gpus + 1e-9)
        check(per_gpu * r.gpu_memory_utilization <= 0.95,
               f"{per_gpu} engines share each GPU (topology.rollout_gpus={gpus:g}) at rollout.gpu_memory_utilization="
               f"{r.gpu_memory_utilization:g}: {per_gpu * r.gpu_memory_utilization:.2f} of a GPU; lower it to "
               f"{0.95 / per_gpu:.2f} or below")


def validate_colocation(cfg: Any) -> None:
    """Colocated: one engine per learner rank, each pair in one bundle (one GPU at most)."""
    t, r, l = cfg.topology, cfg.rollout, cfg.learner
    check(r.num_actors == l.num_ranks, f"topology.colocate pairs each engine with a learner rank: "
                                        f"rollout.num_actors ({r.num_actors}) must equal learner.num_ranks ({l.num_ranks})")
    check(r.tensor_parallel_size == 1, "topology.colocate needs rollout.tensor_parallel_size=1")
    check(sync_backend(cfg) in ("shared", "gloo"), "topology.colocate moves weights with sync.backend=shared "
                                                    "(or gloo); NCCL cannot join two processes on one GPU")
    gpus = (t.rollout_gpus, t.learner_gpus)
    check(all(g == 0 for g in gpus) or (all(g > 0 for g in gpus) and sum(gpus) <= 1),
           f"topology.colocate shares one GPU per pair: topology.rollout_gpus + topology.learner_gpus must be <= 1 "
           f"with both > 0 (e.g. 0.5 and 0.5), or both 0 on CPU; got {gpus[0]:g} and {gpus[1]:g}")


def sync_backend(cfg: Any) -> str:
    """The weight-broadcast backend: `sync.backend`, or for `auto` NCCL when both sides have GPUs."""
    if cfg.sync.backend != "auto":
        return cfg.sync.backend
    if cfg.topology.colocate:
        return "shared"
    return "nccl" if cfg.topology.rollout_gpus > 0 and cfg.topology.learner_gpus > 0 else "gloo"
