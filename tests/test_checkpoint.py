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

from orchestration.checkpoint import CheckpointError, Checkpoints, RunState, choose_resume, write_driver_files
from orchestration.config import Config, ConfigError
from orchestration.control import RunStopped, StopFlag


def write_file(name: str, text: str = "x"):
    return lambda d: (d / name).write_text(text)


def test_a_killed_write_leaves_the_previous_checkpoint_usable(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from orchestration.checkpoint import Checkpoints
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
    from orchestration.lifecycle import Lifecycle

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
