"""WeightSync's verdict on what the engines report loading, with stand-in learner and engines (Ray
actors that answer like the real ones, no model): a push whose checksums differ from the learner's
fails naming the engine's slot and promotes nobody; matching checksums promote every member."""

from __future__ import annotations

import sys
import threading

import pytest
import ray.cloudpickle

from orchestration.cluster.weight_sync import WeightSync, WeightSyncError

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module

SENT = [(11, 22), (33, 44)]  # the learner's per-bucket checksums


class StandInRank:
    def address(self) -> str:
        return "127.0.0.1:1"

    def join(self, **_):
        return None

    def broadcast(self):
        return SENT


class StandInEngine:
    def __init__(self, loaded):
        self.loaded = loaded

    def join_weight_group(self, **kw):
        return [kw["rank_offset"]]

    def receive_weights(self, version):
        return self.loaded

    def ready(self):
        return True


class StandInLearner:
    def __init__(self, ray):
        self.ray = ray
        self.workers = [ray.remote(StandInRank).remote()]

    def weight_manifest(self):
        return [("w", (2,))]

    def adapter_config(self):
        return None

    def join_weight_group(self, **kw):
        return [w.join.remote(**kw) for w in self.workers]

    def broadcast_weights(self):
        return [w.broadcast.remote() for w in self.workers]


class StandInPool:
    timeout_s = 30.0

    def __init__(self, actors):
        self.actors, self.lock, self.needs_resync, self.promoted = list(actors), threading.RLock(), True, []

    def members(self):
        return [(a, slot) for slot, a in enumerate(self.actors)]

    def admit(self):
        pass

    def promote(self, actors):
        self.promoted += actors

    def drop(self, actor, why):
        raise AssertionError(f"no engine should be dropped here: {why}")


def _sync(ray, loaded_per_engine):
    engines = [ray.remote(StandInEngine).remote(loaded) for loaded in loaded_per_engine]
    pool = StandInPool(engines)
    sync = WeightSync(StandInLearner(ray), pool, backend="gloo", dtype="float32", bucket_mb=1, timeout_s=30)
    return sync, pool


def test_matching_checksums_promote_every_engine(ray_local):
    sync, pool = _sync(ray_local, [SENT, SENT])
    sync.push(1)
    assert sync.version == 1 and len(pool.promoted) == 2 and sync.slot_checksums == {0: SENT, 1: SENT}


def test_a_mismatched_sync_fails_naming_the_engine(ray_local):
    stale = [(11, 22), (33, 45)]  # one bucket loaded differently
    sync, pool = _sync(ray_local, [SENT, stale])
    with pytest.raises(WeightSyncError, match=r"engine in slot 1 loaded weights unlike the learner's \(v1\)"):
        sync.push(1)
    assert pool.promoted == [] and sync.version == 0
