"""Long runs, end to end through the CLI: a run stopped by SIGTERM and resumed equals an
uninterrupted one (metrics and final weights); a checkpoint exports to a Hugging Face directory;
a running job's rollout pool is scaled 1 → 2 → 1 from outside; Ctrl-C twice stops with one line
and leaves only complete checkpoints (that the second one stops at once, whatever the run is doing,
is tested on the signal handler itself in test_checkpoint.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Smoke with one engine and no evaluation: the cheapest run that still has 2 learner ranks.
BASE = ["experiment=smoke", "rollout.num_actors=1", "eval.enabled=false", "logger.progress=false",
        "logger.wandb.mode=disabled"]


def start(out: Path, cache_dir: str, *overrides: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    env["RAYGRPO_CACHE"] = cache_dir
    log = open(f"{out}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "orchestration", f"output_dir={out}", *BASE, *overrides],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 400) -> tuple[int, str]:
    proc.wait(timeout=timeout)
    return proc.returncode, Path(f"{out}.log").read_text()


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, every: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended first (exit {proc.returncode})"
        assert time.time() < deadline, "timed out"
        time.sleep(every)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "orchestration", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_sigterm_and_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = start(whole, cache_dir, "steps=4")  # side by side: two local Ray clusters
    proc = start(cut, cache_dir, "steps=4")
    wait_for(lambda: len(metrics(cut)) >= 2, proc)  # step 1 logged: SIGTERM lands in step 2
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, cut)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    code, whole_log = finish(reference, whole)
    assert code == 0, whole_log[-3000:]
    assert "stopped by SIGTERM after step" in log and "Traceback" not in log
    checkpoints = sorted((cut / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMPLETE").exists()
    stopped_at = int(checkpoints[0].name.split("_")[1])
    assert 2 <= stopped_at <= 3, stopped_at  # steps left to run after the resume
    assert not (cut / "policy").exists()

    exported = cli("export", f"checkpoint={checkpoints[0]}", f"out={tmp_path / 'exported'}")
    assert exported.returncode == 0, exported.stderr[-2000:]

    code, log = finish(start(cut, cache_dir, "steps=4", "resume=auto"), cut)
    assert code == 0, log[-3000:]
    assert f"resumed from {checkpoints[0]}: step {stopped_at}" in log

    a, b = metrics(whole), metrics(cut)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 1, 2, 3]  # nothing lost, nothing twice
    for key in ("reward/mean", "learner/loss", "learner/grad_norm", "rollout/response_length_mean"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bit for bit
    sync_a, sync_b = (json.loads((d / "sync.json").read_text()) for d in (whole, cut))
    assert sync_a["engine_checksums"] == sync_b["engine_checksums"] and sync_b["version"] == 4

    # the export of the step-`stopped_at` checkpoint loads in transformers and holds that step's weights
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    final = AutoModelForCausalLM.from_pretrained(cut / "policy")
    start_weights = AutoModelForCausalLM.from_pretrained(os.path.join(cache_dir, "models", "tiny-qwen2"))
    name = "model.layers.0.mlp.up_proj.weight"
    params = [dict(m.named_parameters())[name] for m in (start_weights, model, final)]
    assert not torch.equal(params[0], params[1]) and not torch.equal(params[1], params[2])


@pytest.mark.slow
def test_scale_a_running_job_then_ctrl_c_twice(tmp_path, cache_dir):
    out = tmp_path / "scaled"
    proc = start(out, cache_dir, "steps=400", "checkpoint.every_n_steps=5", "checkpoint.keep=2")
    wait_for(lambda: len(metrics(out)) >= 1, proc)
    up = cli("scale", "rollout=2", f"run={out}")
    assert up.returncode == 0, up.stderr[-2000:]
    wait_for(lambda: any(r.get("rollout/num_actors") == 2 for r in metrics(out)), proc, every=0.5)
    down = cli("scale", "rollout=1", f"run={out}")
    assert down.returncode == 0, down.stderr[-2000:]
    wait_for(lambda: metrics(out)[-1].get("rollout/num_actors") == 1, proc, every=0.5)

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    code, log = finish(proc, out, timeout=60)
    assert code == 130, log[-3000:]
    # the second Ctrl-C stops at once, unless the first one's step and checkpoint were already done
    assert ("raygrpo: stopped at once; resume=auto continues from" in log
            or "raygrpo: stopped by SIGINT after step" in log), log[-3000:]
    assert "Traceback" not in log

    rows = metrics(out)
    counts = [r["rollout/num_actors"] for r in rows]
    assert counts[0] == 1 and 2 in counts and counts[-1] == 1
    assert all(r["rollout/actors_lost"] == 0 for r in rows)
    # at most `keep` checkpoints, each complete (a write cut short stays a `.partial-*` that no resume reads)
    kept = sorted((out / "checkpoints").glob("step_*"))
    assert 1 <= len(kept) <= 2 and all((k / "COMPLETE").exists() for k in kept)
