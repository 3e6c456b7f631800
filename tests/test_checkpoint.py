"""Checkpoints without actors: atomic writes (a killed write, a full disk), keeping the newest,
choosing what to resume and refusing an incompatible config, stop signals, and the guard that
stops a run whose learner keeps skipping updates."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from orchestration.train.checkpoint import CheckpointError, Checkpoints, RunState, choose_resume, write_driver_files
from orchestration.config import Config, ConfigError
from orchestration.cluster.control import RunStopped, StopFlag


def write_file(name: str, text: str = "x"):
    return lambda d: (d / name).write_text(text)


def test_a_killed_write_leaves_the_previous_checkpoint_usable(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from orchestration.train.checkpoint import Checkpoints
c = Checkpoints({str(tmp_path)!r})
c.write(1, lambda d: (d / "weights").write_text("one"))
def slow(d):
    (d / "weights").write_text("two, half written")
    time.sleep(60)
c.write(2, slow)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    partial = tmp_path / "checkpoints" / ".partial-step_00000002" / "weights"
    deadline = time.time() + 60
    while not partial.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.latest().name == "step_00000001"
    assert (checkpoints.latest() / "weights").read_text() == "one"
    checkpoints.write(2, write_file("weights", "two"))  # the next write clears the remains
    assert checkpoints.latest().name == "step_00000002" and not list(checkpoints.root.glob(".partial-*"))


def test_a_full_disk_fails_the_write_with_one_line_and_keeps_the_previous(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    checkpoints.write(1, write_file("weights", "one"))

    def full(directory):
        (directory / "weights").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match="checkpoint of step 2 not written .*No space left on device.*"
                                              "newest complete one is .*step_00000001"):
        checkpoints.write(2, full)
    assert [p.name for p in checkpoints.root.iterdir()] == ["step_00000001"]


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (3, 6, 9, 12):
        checkpoints.write(step, write_file("weights", str(step)))
    assert [p.name for p in checkpoints.complete()] == ["step_00000009", "step_00000012"]


def cfg_at(out: Path, *overrides: str):
    cfg = OmegaConf.merge(OmegaConf.structured(Config()), OmegaConf.from_dotlist(
        ["model.path=builtin:tiny-qwen2", f"output_dir={out}", *overrides]))
    return cfg


def save_config(out: Path, step: int, cfg) -> Path:
    config = OmegaConf.to_container(cfg, resolve=True)
    return Checkpoints(out).write(step, lambda d: write_driver_files(d, RunState(step=step), config, out))


def test_resume_choices(tmp_path, caplog):
    fresh = cfg_at(tmp_path, "resume=auto")
    assert choose_resume(fresh) is None and "no complete checkpoint" in caplog.text  # nothing yet: start at 0
    save_config(tmp_path, 4, cfg_at(tmp_path))
    newest = save_config(tmp_path, 8, cfg_at(tmp_path))
    assert choose_resume(fresh) == newest
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run .*step_00000008.*resume=auto"):
        choose_resume(cfg_at(tmp_path))  # resume=never must not overwrite them
    older = tmp_path / "checkpoints" / "step_00000004"
    assert choose_resume(cfg_at(tmp_path, f"resume={older}")) == older
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        choose_resume(cfg_at(tmp_path, f"resume={tmp_path}"))


def test_a_checkpoint_of_another_config_is_refused_and_which_changes_are_allowed(tmp_path, caplog):
    save_config(tmp_path, 4, cfg_at(tmp_path))
    with pytest.raises(ConfigError, match=r"another config: model\.path \('builtin:tiny-qwen2' -> "
                                          r"'builtin:smollm2-135m'\); these may not change on resume"):
        choose_resume(cfg_at(tmp_path, "resume=auto", "model.path=builtin:smollm2-135m"))
    with pytest.raises(ConfigError, match=r"rollout\.prompts_per_step"):
        choose_resume(cfg_at(tmp_path, "resume=auto", "rollout.prompts_per_step=8"))
    # longer, more engines, another lr: allowed; only the last makes the run inexact
    assert choose_resume(cfg_at(tmp_path, "resume=auto", "steps=40", "rollout.num_actors=3")) is not None
    assert "not bit for bit" not in caplog.text
    assert choose_resume(cfg_at(tmp_path, "resume=auto", "learner.lr=3e-6")) is not None
    assert "not bit for bit): learner.lr" in caplog.text


def test_first_signal_asks_to_stop_after_the_step_second_sigint_stops_now():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


def stand_in_life(tmp_path, max_skipped: int, every: int = 0):
    from orchestration.train.lifecycle import Lifecycle

    cfg = cfg_at(tmp_path, f"learner.max_skipped_steps={max_skipped}", f"checkpoint.every_n_steps={every}", "steps=100")
    life = Lifecycle(cfg, OmegaConf.to_container(cfg, resolve=True), None)
    learner = SimpleNamespace(save_checkpoint=lambda d: Path(d, "learner").write_text("weights"))
    life.actors = SimpleNamespace(learner=learner, sync=SimpleNamespace(version=0))
    life.logger = SimpleNamespace(wandb_id=None, samples_bytes=lambda: 0)
    producer = SimpleNamespace(produced=dict, finished_evals=lambda wait: [])
    return life, producer


def test_repeated_skipped_updates_stop_the_run_with_a_checkpoint(tmp_path):
    life, producer = stand_in_life(tmp_path, max_skipped=2)
    skipped, fine = {"skipped_steps": 1.0}, {"skipped_steps": 0.0}
    for step, m in enumerate([skipped, skipped, fine, skipped, skipped]):  # never more than 2 in a row
        life.after_step(step, producer, m)
    assert life.state.skipped_in_a_row == 2 and not (tmp_path / "checkpoints").exists()
    with pytest.raises(RunStopped, match="skipped 3 updates in a row .*stopped after step 5; checkpoint "
                                         ".*step_00000006; continue with resume=auto") as stop:
        life.after_step(5, producer, skipped)
    assert stop.value.exit_code == 1
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["step"] == 6


def test_periodic_checkpoints_and_a_signal_stop(tmp_path):
    life, producer = stand_in_life(tmp_path, max_skipped=3, every=2)
    for step in range(5):
        life.after_step(step, producer, {"skipped_steps": 0.0})
    assert [p.name for p in life.checkpoints.complete()] == ["step_00000002", "step_00000004"]
    life.stop.signum = signal.SIGTERM
    with pytest.raises(RunStopped, match="stopped by SIGTERM after step 5; checkpoint .*step_00000006") as stop:
        life.after_step(5, producer, None)
    assert stop.value.exit_code == 128 + signal.SIGTERM


# ---------------------------------------------------------------- the driver state as data, hostile checkpoints

def a_run_state():
    """A RunState with every kind of thing a real one holds: evaluations, a queued step's groups
    and scores (a chat prompt, a failed sample), metrics, row metadata and the RNG states."""
    from actors.scoring import Score
    from actors.types import Completion, Group, Prompt
    from orchestration.train.checkpoint import capture_rng
    from orchestration.train.evaluation import EvalResult
    from orchestration.train.producer import Sampled
    from tasks.base import Problem

    chat = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"})
    problems = {"p0": Problem("p0", chat, "4", {"level": 3, "$odd key": [1, None], "nested": {"k": (1, 2.5)}}, "t:1"),
                "p1": Problem("p1", "3+3?", "6", {}, "t:2")}
    groups = [Group(Prompt("p0", chat, "sys"), [5, 6, 7], [Completion([1, 2], [-0.1, -1e-300], "stop", "4"),
                                                             Completion([3], [float("-inf")], "length", "x")], 2),
              Group(Prompt("p1", "3+3?"), [8], [Completion([], [], "abort", ""),  # a multi-turn trajectory:
                                                Completion([1, 9, 9, 2], [-0.5, 0.0, 0.0, -0.25], "stop", "6",
                                                           mask=[1, 0, 0, 1],
                                                           turns=[{"role": "assistant", "content": "a"},
                                                                  {"role": "tool", "content": "6"}],
                                                           info={"turns": 2.0, "tool_calls": 1.0})], 3)]
    scores = [[Score(1.0, {"accuracy": 1.0}, "ok"), Score(0.0, {}, "failed", "timeout after 5 s")],
              [Score(0.1 + 0.2, {"accuracy": 0.1 + 0.2}, "ok"), Score(1.0, {"accuracy": 1.0}, "ok")]]
    sampled = Sampled(groups, scores, ["p9"], {"time/generate": 1.25, "sampling/rounds": 1.0}, problems)
    evals = [EvalResult({"eval/accuracy": 0.5}, [{"prompt": "q", "answer": "1", "reply": "r", "correct": True}])]
    return RunState(step=7, version=6, evals=evals, pending={"eval/pass@4": 0.75}, queued={7: sampled, 8: sampled},
                    skipped_in_a_row=1, wandb_id="abc123", samples_bytes=4096, rng=capture_rng())


def draws():
    import random

    import numpy as np
    import torch

    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_the_driver_state_round_trips_through_json_exactly(tmp_path):
    from orchestration.train.checkpoint import read_state, restore_rng

    import numpy as np
    np.random.randn()  # a cached gaussian in numpy's state
    state = a_run_state()
    expected = draws()
    write_driver_files(tmp_path, state, {"seed": 1}, tmp_path)
    assert not (tmp_path / "run.pkl").exists()
    json.loads((tmp_path / "run.json").read_text())  # plain JSON
    draws()  # move every generator on
    restored = read_state(tmp_path)
    assert restored == state
    assert isinstance(restored.queued[7].groups[0].prompt.content, tuple) and list(restored.queued) == [7, 8]
    assert restored.queued[7].problems["p0"].metadata["nested"]["k"] == (1, 2.5)
    restore_rng(restored.rng)
    assert draws() == expected


def test_run_json_builds_only_the_allowlisted_types(tmp_path):
    from orchestration.train.checkpoint import read_state

    cfg = cfg_at(tmp_path)
    where = save_config(tmp_path, 4, cfg)
    for hostile in ({"$os.system": {"command": "true"}}, {"$RunState": {"step": 1}}, {"$tuple": "abc"},
                    {"$Group": {"prompt": 1}, "step": 2}):
        (where / "run.json").write_text(json.dumps({"format": 1, "state": hostile}))
        with pytest.raises(ConfigError, match="is not a raygrpo driver state"):
            read_state(where)


def test_a_state_written_before_later_fields_reads_with_their_defaults():
    from actors.types import Completion, Prompt
    from orchestration.train.checkpoint import from_json, state_types, to_json

    types = state_types()
    old = to_json(Completion(token_ids=[1, 2], logprobs=[-0.1, -0.2], finish_reason="stop", text="x"), types)
    for key in ("mask", "turns", "info"):  # what a checkpoint of the single-turn version held
        del old["$Completion"][key]
    assert from_json(old, types).mask is None
    prompt = to_json(Prompt("p", "hi"), types)
    del prompt["$Prompt"]["answer"], prompt["$Prompt"]["metadata"]
    assert from_json(prompt, types) == Prompt("p", "hi")
    del prompt["$Prompt"]["content"]  # a field that was always there stays required
    with pytest.raises(ValueError, match="malformed tag"):
        from_json(prompt, types)


def test_an_old_checkpoint_with_a_pickle_is_refused_unread(tmp_path):
    from orchestration.train.checkpoint import read_state
    from tests.reward_fixtures import hostile_pickle

    marker = tmp_path / "pwned"
    where = save_config(tmp_path, 4, cfg_at(tmp_path))
    (where / "run.json").unlink()
    (where / "run.pkl").write_bytes(hostile_pickle(str(marker)))
    for attempt in (lambda: choose_resume(cfg_at(tmp_path, "resume=auto")), lambda: read_state(where)):
        with pytest.raises(ConfigError, match="written by an older raygrpo: its driver state is a pickle .*not loaded"):
            attempt()
    assert not marker.exists()


def test_a_learner_rank_file_loads_only_plain_data(tmp_path):
    import pickle

    import torch

    from learner.checkpoint_io import read_rank_state
    from learner.worker import _lr_lambda
    from tests.reward_fixtures import _Touch

    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(2, "cosine", 10))
    optimizer.step()
    scheduler.step()
    genuine = {"scheduler": scheduler.state_dict(), "rng": {"cpu": torch.get_rng_state(), "cuda": None}, "world_size": 2}
    torch.save(genuine, tmp_path / "rank0.pt")  # as LearnerWorker.save_checkpoint writes it
    loaded = read_rank_state(str(tmp_path / "rank0.pt"))
    assert loaded["scheduler"] == genuine["scheduler"] and torch.equal(loaded["rng"]["cpu"], genuine["rng"]["cpu"])

    marker = tmp_path / "pwned"
    torch.save({**genuine, "scheduler": _Touch(str(marker))}, tmp_path / "rank1.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_rank_state(str(tmp_path / "rank1.pt"))
    assert not marker.exists()
    torch.load(tmp_path / "rank1.pt", weights_only=False)  # what it would have done before
    assert marker.exists()


def test_learner_dcp_metadata_and_items_are_read_without_running_code(tmp_path):
    import pickle
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from learner.checkpoint_io import SafeLoadPlanner, SafeReader
    from tests.reward_fixtures import _Touch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        weights, optim = get_state_dict(model, optimizer)
        dcp.save({"model": weights, "optim": optim}, checkpoint_id=tmp_path / "learner")
        fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)).to(torch.bfloat16)
        fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=5.0)
        fresh(torch.randn(2, 3, dtype=torch.bfloat16)).sum().backward()
        fresh_optimizer.step()
        state = dict(zip(("model", "optim"), get_state_dict(fresh, fresh_optimizer)))
        dcp.load(state, storage_reader=SafeReader(tmp_path / "learner"), planner=SafeLoadPlanner())
    assert all(torch.equal(a, b) for a, b in zip(state["model"].values(), weights.values()))
    assert state["optim"]["param_groups"][0]["lr"] == 1e-3

    marker = tmp_path / "pwned"
    (tmp_path / "learner" / ".metadata").write_bytes(pickle.dumps(_Touch(str(marker))))
    with pytest.raises(pickle.UnpicklingError, match="refers to posix.system.*refused"):
        SafeReader(tmp_path / "learner").read_metadata()
    with pytest.raises(dcp.api.CheckpointException):  # as the learner calls it
        dcp.load(state, storage_reader=SafeReader(tmp_path / "learner"), planner=SafeLoadPlanner())
    assert not marker.exists()


def test_learner_dcp_non_tensor_items_load_only_as_plain_data(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from learner.checkpoint_io import SafeLoadPlanner, SafeReader
    from tests.reward_fixtures import _Touch

    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"lr": 1e-3, "note": _Touch(str(marker))}, checkpoint_id=tmp_path / "learner")
        with pytest.raises(dcp.api.CheckpointException, match="weights_only|Weights only"):
            dcp.load({"lr": 0.0, "note": None}, storage_reader=SafeReader(tmp_path / "learner"),
                     planner=SafeLoadPlanner())
        assert not marker.exists()
        dcp.load({"lr": 0.0, "note": None}, checkpoint_id=tmp_path / "learner")  # DCP's own planner runs it
    assert marker.exists()


def test_a_checkpoint_is_renamed_into_place_not_copied(tmp_path):
    """The staging directory becomes the checkpoint by one rename (same inode): a copy-then-delete
    would leave a window in which a crash makes a half-copied `step_N` look like a checkpoint."""
    seen = {}

    def fill(directory: Path) -> None:
        (directory / "data").write_text("x")
        seen["inode"] = os.stat(directory).st_ino

    final = Checkpoints(tmp_path).write(3, fill)
    assert final.name == "step_00000003" and os.stat(final).st_ino == seen["inode"]
    assert (final / "COMPLETE").is_file() and not list(final.parent.glob(".partial-*"))


def test_storage_the_learner_ranks_do_not_share_is_refused(tmp_path):
    """A learner rank whose writes land elsewhere (its own node's disk, a relative path in a job's
    working-dir copy) is named before any step; shared storage passes and leaves nothing behind."""
    elsewhere = tmp_path / "node-b"

    def ranks(shared_ranks):
        def write_markers(directory: str, name: str) -> list[str]:
            for r in range(2):
                where = Path(directory) if r in shared_ranks else elsewhere / Path(directory).relative_to("/")
                where.mkdir(parents=True, exist_ok=True)
                (where / f"{name}-rank{r}").write_text("node")
            return ["10.0.0.1", "10.0.0.2"]
        return write_markers

    checkpoints = Checkpoints(tmp_path / "run")
    checkpoints.check_shared(ranks({0, 1}))
    assert not (checkpoints.root / ".storage-check").exists()
    with pytest.raises(ConfigError, match=r"not on storage the driver shares with learner rank 1 on 10.0.0.2: "
                                          r"checkpoint shards would stay") as info:
        checkpoints.check_shared(ranks({0}))
    assert "\n" not in str(info.value)
