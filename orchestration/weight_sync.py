"""WeightSync: form the learner→engines broadcast group and push versioned weights through it.

Membership is learner rank 0 (root) plus every worker of every live rollout engine; colocated
(`shared` backend), one pair per engine: the learner rank beside it and the engine. `connect()`
forms a new generation of the group; call it again after an engine is lost or added. `push()`
broadcasts, waits with a deadline, and compares every engine's per-bucket checksums with the
learner's: a mismatch or a timeout raises, so an engine never silently keeps stale weights.
"""

from __future__ import annotations

import time

import ray

from learner.group import LearnerGroup
from learner.weights import checksums_match
from orchestration.pools import RolloutPool


class WeightSyncError(RuntimeError):
    pass


class WeightSync:
    def __init__(self, learner: LearnerGroup, rollout: RolloutPool, *, backend: str, dtype: str,
                 bucket_mb: int, timeout_s: float, workers_per_engine: int = 1):
        self.learner, self.rollout = learner, rollout
        self.backend, self.dtype, self.timeout_s = backend, dtype, timeout_s
        self.bucket_bytes = bucket_mb << 20
        self.workers_per_engine = workers_per_engine
        self.manifest = learner.weight_manifest()
        self.generation = -1
        self.version = 0
        self.last_checksums: list[tuple[int, int]] = []  # what the engines reported loading
        self.waited_s = 0.0  # last push: time spent waiting for generations in flight

    def connect(self) -> None:
        """Form a new generation of the group with the current engines."""
        self.generation += 1
        common = dict(generation=self.generation, timeout_s=self.timeout_s, backend=self.backend, dtype=self.dtype,
                      bucket_bytes=self.bucket_bytes)
        if self.backend == "shared":
            refs = self._connect_pairs(common)
        else:
            host, port = ray.get(self.learner.workers[0].address.remote()).rsplit(":", 1)
            common.update(host=host, port=int(port), world_size=1 + len(self.rollout.actors) * self.workers_per_engine)
            refs = self.learner.join_weight_group(**common)
            refs += [a.join_weight_group.remote(rank_offset=1 + i * self.workers_per_engine, manifest=self.manifest,
                                                **common) for i, a in enumerate(self.rollout.actors)]
        self._wait(refs, "joining the weight-broadcast group")
        self.rollout.needs_resync = False

    def _connect_pairs(self, common: dict) -> list:
        """Colocated: learner rank i shares with the engine placed beside it (slot i), one pair each."""
        slots = self.rollout.slots
        addresses = ray.get([self.learner.workers[s].address.remote() for s in slots])
        roots = [""] * len(self.learner.workers)
        for slot, address in zip(slots, addresses):
            roots[slot] = address
        refs = self.learner.join_weight_group(host="", port=0, world_size=2, roots=roots, **common)
        for actor, address in zip(self.rollout.actors, addresses):
            host, port = address.rsplit(":", 1)
            refs.append(actor.join_weight_group.remote(host=host, port=int(port), rank_offset=1, world_size=2,
                                                       manifest=self.manifest, **common))
        return refs

    def push(self, version: int) -> None:
        """Broadcast the learner's weights as `version`; verify every engine loaded them. Generations
        in flight (max_staleness >= 1) finish first with the weights they started with, and none is
        queued before the load: the broadcast starts when the engines are ready to receive it."""
        with self.rollout.lock:
            start = time.perf_counter()
            busy = self.rollout.call("ready")  # answered once each engine's queued generations are done
            ray.wait(busy, num_returns=len(busy), timeout=self.rollout.timeout_s)
            self.waited_s = time.perf_counter() - start  # for the engines to finish generating
            engine_refs = self.rollout.call("receive_weights", version)
        learner_refs = self.learner.broadcast_weights()
        results = self._wait(learner_refs + engine_refs, f"weight sync v{version}")
        sent = next((r for r in results[:len(learner_refs)] if r), [])  # every sending rank sends the same
        received = results[len(learner_refs):]
        for i, sums in enumerate(received):
            if not checksums_match(sent, sums):
                raise WeightSyncError(f"engine {i} loaded weights that differ from the learner's (v{version})")
        self.version, self.last_checksums = version, received[0] if received else sent

    def _wait(self, refs: list, what: str) -> list:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if len(ready) < len(refs):
            raise WeightSyncError(f"{what} missed its {self.timeout_s:g} s deadline")
        return ray.get(refs)
