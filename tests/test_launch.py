"""One shutdown for every actor kind and every stage (`orchestration.cluster.launch.Actors`).

Stand-ins replace the pools and the learner group (no Ray, no engines): each records its
`shutdown` in a shared list, and the placement records its release there too, so the tests see
what was stopped, how often, and in which order.
"""

from __future__ import annotations

import logging

import pytest

from orchestration.cluster.launch import Actors
from tasks.base import Problem


class Boom(RuntimeError):
    """The failure a stand-in raises where the stage would do real work."""


class Part:
    """A rollout pool, reward pool or learner group: stopping is recorded; any other call fails."""

    def __init__(self, events: list[str], kind: str, fails: bool = False):
        self.events, self.kind, self.fails = events, kind, fails

    def shutdown(self) -> None:
        self.events.append(self.kind)
        if self.fails:
            raise RuntimeError(f"{self.kind} is gone")

    def __getattr__(self, name: str):  # generate, score, logprobs, ...: the stage's work fails here
        raise Boom(f"{self.kind}.{name}")


class FakePlacement:
    def __init__(self, events: list[str]):
        self.events, self.options = events, {}

    def describe(self) -> str:
        return "fake placement"

    def save(self, path) -> None:
        pass

    def release(self) -> None:
        self.events.append("release")


class FakeTask:
    def train_batch(self, step: int, n: int) -> list[Problem]:
        return [Problem(f"{step}-{i}", "What is 1 + 1?", "2") for i in range(n)]

    def test_set(self) -> list[Problem]:
        return self.train_batch(0, 2)


def cfg_for(stage: str, tmp_path):
    from tests.test_config import make_cfg

    cfg = make_cfg("logger.wandb.mode=disabled", "logger.progress=false", f"output_dir={tmp_path}")
    cfg.stage = stage
    return cfg


def test_shutdown_stops_each_kind_once_and_survives_one_that_raises(caplog):
    events: list[str] = []
    actors = Actors(rollout=Part(events, "rollout"), rewards=Part(events, "reward", fails=True),
                    learner=Part(events, "learner"), sync=object())
    with caplog.at_level(logging.ERROR, logger="raygrpo"):
        actors.shutdown()
        actors.shutdown()  # a second call (a stage's `with` after an explicit one) stops nothing again
    assert events == ["rollout", "reward", "learner"]
    assert "stopping the reward actors failed" in caplog.text
    assert actors.rollout is actors.rewards is actors.learner is actors.sync is None
    Actors().shutdown()  # nothing started: nothing to stop


def test_start_actors_stops_what_started_when_a_part_fails(monkeypatch, tmp_path):
    from orchestration.cluster import launch

    events: list[str] = []
    monkeypatch.setattr(launch, "start_rollout", lambda cfg, placement: Part(events, "rollout"))
    monkeypatch.setattr(launch, "start_rewards", lambda cfg, placement: Part(events, "reward"))

    def no_learner(cfg, placement, spec):
        assert spec.share_prompts == cfg.learner.share_prompts and spec.total_steps == cfg.steps
        raise Boom("learner")

    monkeypatch.setattr(launch, "start_learner", no_learner)
    with pytest.raises(Boom):
        launch.start_actors(cfg_for("train", tmp_path), FakePlacement(events))
    assert events == ["rollout", "reward"]


@pytest.mark.parametrize("stage, started", [
    ("train", ["rollout", "reward", "learner"]), ("eval", ["rollout"]), ("sft", ["learner"]),
    ("distill", ["learner"]), ("rejection_sampling", ["rollout", "reward"])])
def test_every_stage_stops_its_actors_then_releases_its_placement(monkeypatch, tmp_path, stage, started):
    """Each stage's run path, failing at its first real work: what it started is stopped once, in
    order, before `stages.run` releases the placement."""
    import common.models
    from orchestration import stages
    from orchestration.cluster import launch, placement
    from orchestration.stages import sft
    from orchestration.stages.sft_data import Encoded, Example
    from orchestration.train import lifecycle, loop

    events: list[str] = []
    monkeypatch.setattr(placement, "place", lambda *a, **k: FakePlacement(events))
    monkeypatch.setattr(common.models, "resolve_model_path", lambda path: path)
    rollout = lambda cfg, placement: Part(events, "rollout")  # noqa: E731
    for module in (launch, loop):
        monkeypatch.setattr(module, "start_rollout", rollout)
    monkeypatch.setattr(launch, "start_rewards", lambda cfg, placement: Part(events, "reward"))
    monkeypatch.setattr(launch, "start_learner", lambda cfg, placement, spec: Part(events, "learner"))
    monkeypatch.setattr(loop, "start_actors", lambda cfg, placement: Actors(
        Part(events, "rollout"), Part(events, "reward"), Part(events, "learner")))

    def attach(self, actors, logger):  # the train stage's first work with its actors
        raise Boom("attach")

    monkeypatch.setattr(lifecycle.Lifecycle, "attach", attach)
    rows = Encoded([[1, 2]] * 2, [[3, 4]] * 2)
    monkeypatch.setattr(sft, "encode_both", lambda cfg, data: (rows, rows))

    cfg = cfg_for(stage, tmp_path)
    data = sft.SFTData([Example("q", "a", "row 1")] * 2, [Example("q", "a", "row 2")], 0, "model")
    with pytest.raises(Boom):
        stages.run(cfg, stages.Prepared(task=FakeTask(), sft=data))
    assert events == started + ["release"]


class Recorder:
    """A colocated learner group or rollout pool that records its calls (no Ray: `ray.get` of a
    list of plain values returns them)."""

    def __init__(self, events: list[str], kind: str):
        self.events, self.kind = events, kind

    def offload(self, what: str = "all"):
        self.events.append(f"learner.offload({what})")

    def reload(self):
        self.events.append("learner.reload")

    def call(self, method: str, *args):
        self.events.append(f"serving.{method}{list(args) if args else ''}")
        return []

    def call_members(self, method: str, *args):
        self.events.append(f"members.{method}{list(args)}")
        return []


def test_the_colocated_hand_over_frees_the_optimizer_first_and_the_kv_cache_last(monkeypatch):
    import orchestration.cluster.launch as launch

    monkeypatch.setattr(launch.ray, "get", lambda refs: refs)
    events: list[str] = []
    actors = Actors(colocated=True)
    actors.learner, actors.rollout = Recorder(events, "learner"), Recorder(events, "rollout")
    actors.to_learner()
    with actors.handover():
        events.append("push")  # each engine takes its weight memory back inside receive_weights
    assert events == ["serving.sleep", "learner.reload", "learner.offload(optimizer)", "push",
                      "learner.offload(all)", "members.wake_up[['kv_cache']]"]  # fresh engines wake too


class FakeLLM:
    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tags))


def test_an_engine_sleeps_at_level_2_and_wakes_its_weights_and_kv_cache_separately():
    from actors.rollout import RolloutActor

    calls: list = []
    engine = RolloutActor.__new__(RolloutActor)  # the sleep bookkeeping alone, no vLLM
    engine.llm, engine.sleeps, engine.asleep = FakeLLM(calls), True, set()
    assert engine.sleep() and engine.sleep()  # asleep once, however often asked
    assert engine.wake_up(["weights"])  # still partly asleep: the KV cache waits
    assert engine.wake_up(["weights"])  # a second wake of the weights does nothing
    assert not engine.wake_up(["kv_cache"])
    assert not engine.wake_up()
    assert calls == [("sleep", 2), ("wake_up", ["weights"]), ("wake_up", ["kv_cache"])]
    engine.sleeps, calls[:] = False, []  # a CPU engine has no sleep mode: nothing reaches vLLM
    assert not engine.sleep() and not engine.wake_up() and calls == []
