"""WeightSync: form the learner→engines broadcast group and push versioned weights through it.

Membership is learner rank 0 (root) plus every worker of every member engine of the rollout pool
(serving and fresh; see `RolloutPool.members`); colocated (`shared` backend), one pair per engine:
the learner rank beside it (rank = the engine's slot) and the engine. `connect()` forms a new
generation of the group. `push()` handles membership itself: it admits engines that came up,
reconnects when the members changed, broadcasts, waits with a deadline, and compares every
engine's per-bucket checksums with the learner's: a mismatch or a timeout raises, so an engine
never silently keeps stale weights. Fresh engines go into service only after that check.

A member that dies or misses the deadline during a join or a broadcast is named (slot and why),
dropped from the pool (a replacement starts in the background) and the push is retried once with
the survivors; a second failure raises WeightSyncError. Members use a collective timeout a little
shorter than the driver's deadline (`member_timeout_s`), so that by the deadline every healthy
member has returned — with the weights, or with the error its lost peer caused — and only the
hung ones are still pending. A learner rank still pending then cannot take part in a retry.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import RayActorError

from learner.group import LearnerGroup, LearnerLost
from learner.group_store import new_secret
from learner.weights import BACKEND_GRACE_S, checksums_match, post_abort
from orchestration.cluster.pools import RolloutPool, _why

log = logging.getLogger("raygrpo")


class WeightSyncError(RuntimeError):
    pass


class EnginesFailed(WeightSyncError):
    """Engines failed a join or a broadcast and were dropped from the pool: a retry may succeed."""


class WeightSync:
    def __init__(self, learner: LearnerGroup, rollout: RolloutPool, *, backend: str, dtype: str,
                 bucket_mb: int, timeout_s: float, workers_per_engine: int = 1):
        self.learner, self.rollout = learner, rollout
        self.backend, self.dtype, self.timeout_s = backend, dtype, timeout_s
        self.bucket_bytes = bucket_mb << 20
        self.workers_per_engine = workers_per_engine
        self.manifest = learner.weight_manifest()
        self.adapter_config = learner.adapter_config()  # LoRA synced as an adapter: the engines' adapter_config.json
        self.generation = -1
        self.members: list[tuple] = []  # (actor, slot) of the current group generation, in rank order
        self.version = 0
        self.last_checksums: list[tuple[int, int]] = []  # what the engines reported loading
        self.sent_checksums: list[tuple[int, int]] = []  # what the learner sent in the last push
        self.slot_checksums: dict[int, list[tuple[int, int]]] = {}  # slot -> what its engine loaded last push
        self.waited_s = 0.0  # last push: time spent waiting for generations in flight
        self.retries = 0  # pushes that had to drop engines and try again
        self.abort_at: tuple | None = None  # (host, port, generation, secret) of the broadcast group, for post_abort

    @property
    def member_timeout_s(self) -> float:
        """The members' own collective timeout: short of the driver's deadline by a margin (and, for
        NCCL, by the grace its watchdog adds), so a healthy member returns before the deadline."""
        margin = min(10.0, 0.25 * self.timeout_s) + (BACKEND_GRACE_S if self.backend == "nccl" else 0.0)
        return max(1.0, self.timeout_s - margin)

    def connect(self) -> None:
        """Form a new generation of the group with the pool's current members."""
        with self.rollout.lock:
            self.generation += 1
            members = self.rollout.members()
            # a fresh secret per generation, to the members through Ray calls only: the store's port
            # is open to anyone who reaches it, the secret is what admits a member (never log it)
            common = dict(generation=self.generation, timeout_s=self.member_timeout_s, backend=self.backend,
                          dtype=self.dtype, bucket_bytes=self.bucket_bytes, secret=new_secret(),
                          manifest=self.manifest)  # one plan for both sides
            if self.backend == "shared":
                learner_refs, engine_refs = self._connect_pairs(members, common)
            else:
                host, port = ray.get(self.learner.workers[0].address.remote()).rsplit(":", 1)
                common.update(host=host, port=int(port), world_size=1 + len(members) * self.workers_per_engine)
                self.abort_at = (host, int(port), self.generation, common["secret"])
                learner_refs = self.learner.join_weight_group(**common)
                engine_refs = [a.join_weight_group.remote(rank_offset=1 + i * self.workers_per_engine,
                                                          adapter_config=self.adapter_config, **common)
                               for i, (a, _) in enumerate(members)]
            self.members = members
            self._finish(learner_refs, engine_refs, members, f"joining weight-broadcast group {self.generation}")
            self.rollout.needs_resync = False

    def _connect_pairs(self, members: list[tuple], common: dict) -> tuple[list, list]:
        """Colocated: learner rank i shares with the engine placed beside it (slot i), one pair each."""
        slots = [slot for _, slot in members]
        addresses = ray.get([self.learner.workers[s].address.remote() for s in slots])
        roots = [""] * len(self.learner.workers)
        for slot, address in zip(slots, addresses):
            roots[slot] = address
        learner_refs = self.learner.join_weight_group(host="", port=0, world_size=2, roots=roots, **common)
        engine_refs = []
        for (actor, _), address in zip(members, addresses):
            host, port = address.rsplit(":", 1)
            engine_refs.append(actor.join_weight_group.remote(host=host, port=int(port), rank_offset=1, world_size=2,
                                                              adapter_config=self.adapter_config, **common))
        return learner_refs, engine_refs

    def push(self, version: int) -> None:
        """Broadcast the learner's weights as `version` to every member engine and verify them; engines
        that came up since the last push are admitted first, and a lost engine costs one retry (see
        the module docstring). Generations in flight (max_staleness >= 1) finish first with the
        weights they started with, and none is queued before the load."""
        try:
            self._push(version)
        except EnginesFailed as first:
            self.retries += 1
            log.error("%s; retrying with the %d engines left", first, len(self.rollout.members()))
            try:
                self._push(version)
            except EnginesFailed as second:
                raise WeightSyncError(f"weight sync v{version} failed twice: {first}; then: {second}") from second

    def _push(self, version: int) -> None:
        """One attempt: admit, wait for generations in flight, reconnect if the members changed, queue
        every load (all under the pool's lock), then broadcast and check."""
        pool = self.rollout
        with pool.lock:
            pool.admit()
            self._wait_idle()
            if pool.needs_resync or self.generation < 0:
                self.connect()
            members = self.members
            engine_refs = [a.receive_weights.remote(version) for a, _ in members]
        learner_refs = self.learner.broadcast_weights()
        learner_out, received = self._finish(learner_refs, engine_refs, members, f"weight sync v{version}")
        sent = next((r for r in learner_out if r), [])  # every sending rank sends the same
        for (_, slot), sums in zip(members, received):
            if not checksums_match(sent, sums):
                raise WeightSyncError(f"engine in slot {slot} loaded weights unlike the learner's (v{version})")
        pool.promote([a for a, _ in members])
        self.version, self.last_checksums = version, received[0] if received else sent
        self.sent_checksums, self.slot_checksums = sent, {slot: sums for (_, slot), sums in zip(members, received)}

    def _wait_idle(self) -> None:
        """Let the serving engines finish their queued generations (up to the pool's deadline); an
        engine found dead meanwhile is dropped before the group is formed."""
        start = time.perf_counter()
        serving = list(self.rollout.actors)
        refs = [a.ready.remote() for a in serving]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.rollout.timeout_s)
        self.waited_s = time.perf_counter() - start  # for the engines to finish generating
        for actor, ref in zip(serving, refs):
            if ref in done:
                try:
                    ray.get(ref)
                except RayActorError as err:
                    self.rollout.drop(actor, f"died before weight sync ({_why(err)})")

    def _finish(self, learner_refs: list, engine_refs: list, members: list[tuple], what: str) -> tuple[list, list]:
        """Results of the learner's and the engines' calls, or an error naming who failed: engines that
        died or missed the deadline are dropped (EnginesFailed); a learner failure is not retried."""
        pending = self._wait_all(learner_refs + engine_refs, what)
        failed, hurt = [], []  # engines to drop; engines alive but failed (a lost peer broke the collective)
        for i, ((actor, slot), ref) in enumerate(zip(members, engine_refs)):
            why = self._failure(ref, pending)
            if why is None:
                continue
            if why.startswith("error"):
                hurt.append(f"engine {i} (slot {slot}) {why}")
            else:
                failed.append((actor, f"engine {i} (slot {slot}) {why}"))
        learner_err = [f"learner rank {r} {why}" for r, ref in enumerate(learner_refs)
                       if (why := self._failure(ref, pending, learner=True))]
        for actor, why in failed:
            self.rollout.drop(actor, f"{what}: {why}")
        if failed:
            names = "; ".join(why for _, why in failed)
            context = f" (then: {'; '.join(learner_err + hurt)})" if learner_err or hurt else ""
            if any("missed" in why for why in learner_err):
                raise WeightSyncError(f"{what} failed: {names}{context}; the learner is still blocked: no retry")
            raise EnginesFailed(f"{what} failed: {names}{context}")
        if learner_err or hurt:
            raise WeightSyncError(f"{what} failed: " + "; ".join(learner_err + hurt))
        return ray.get(learner_refs), ray.get(engine_refs)

    def _wait_all(self, refs: list, what: str) -> list:
        """Wait for every call up to the deadline; returns the ones still pending. The first call to
        fail (a member died, or its collective broke) makes the driver abort the broadcast group, so
        the healthy members stop at once instead of at their deadline (`learner.weights.post_abort`)."""
        deadline = time.monotonic() + self.timeout_s
        pending, aborted = list(refs), False
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                break
            if not aborted and self.abort_at is not None and _raised(done[0]):
                aborted = True
                post_abort(*self.abort_at, why=f"{what}: a member failed")
        if pending and not aborted and self.abort_at is not None:
            post_abort(*self.abort_at, why=f"{what}: the driver's {self.timeout_s:g} s deadline passed")
        return pending

    def _failure(self, ref, pending: list, learner: bool = False) -> str | None:
        """Why a member's call failed: "died ...", "missed ...", "error ..." (alive), or None (it succeeded)."""
        if ref in pending:
            return f"missed the {self.timeout_s:g} s deadline"
        try:
            ray.get(ref)
        except RayActorError as err:
            if learner:
                raise LearnerLost(f"a learner rank died during the weight sync ({_why(err)})") from err
            return f"died ({_why(err)})"
        except Exception as err:  # noqa: BLE001 - the member's own error, e.g. its collective timed out
            return f"error ({_why(err)})"
        return None


def _raised(ref) -> bool:
    """Whether a finished call failed."""
    try:
        ray.get(ref, timeout=0)
    except Exception:  # noqa: BLE001 - any failure of a finished call
        return True
    return False
