"""End to end: `raygrpo experiment=r1_smoke` (the R1 recipe with the tiny model) as a user runs it,
then again: every stage finished, nothing re-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STAGES = ["start", "cold_start", "cold_start/eval", "grpo", "grpo/eval", "sample", "distill", "distill/eval"]


def raygrpo(out: Path, cache: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    env["RAYGRPO_CACHE"] = cache
    return subprocess.run([sys.executable, "-m", "orchestration", "experiment=r1_smoke", f"output_dir={out}",
                           "logger.progress=false", *overrides], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def r1_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("r1") / "run"
    res = raygrpo(out, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_stage_writes_its_outputs_and_the_table(r1_run):
    out, res = r1_run
    for name in STAGES:
        assert (out / name / "DONE.json").is_file(), name
    table = (out / "report.md").read_text()
    for row in ("| start |", "| cold_start |", "| grpo |", "| distill |"):
        assert row in table
    assert "| policy | accuracy | format_rate | response_length |" in table
    assert "held-out evaluation by stage" in res.stdout
    evals = {r["name"]: r["metrics"] for r in json.loads((out / "pipeline.json").read_text()) if r["stage"] == "eval"}
    assert set(evals) == {"start", "cold_start/eval", "grpo/eval", "distill/eval"}
    assert all({"eval/accuracy", "eval/format_rate", "eval/response_length"} <= set(m) for m in evals.values())


def test_cold_start_sft_lowers_held_out_loss(r1_run):
    out, _ = r1_run
    rows = jsonl(out / "cold_start" / "train.jsonl")
    assert len(rows) == 40 and all(r["response"].startswith("<think>") for r in rows)
    sft = json.loads((out / "cold_start" / "sft.json").read_text())
    assert sft["train_rows"] + sft["val_rows"] == 40 and sft["val_rows"] == 4
    assert sft["val_loss_end"] < sft["val_loss_start"] - 0.3
    logged = jsonl(out / "cold_start" / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(sft["steps"]))
    assert "sft/val_loss" in logged[-1] and (out / "cold_start" / "policy" / "config.json").is_file()


def test_grpo_stage_starts_from_the_sft_policy_and_logs_reasoning_metrics(r1_run):
    out, _ = r1_run
    config = json.loads((out / "grpo" / "config.json").read_text())
    assert config["model"]["path"] == str(out / "cold_start" / "policy")
    rows = jsonl(out / "grpo" / "metrics.jsonl")
    assert len(rows) == 2
    for key in ("reasoning/length_mean", "reasoning/length_p50", "reasoning/length_p90", "reasoning/length_max",
                "reasoning/reflection_rate", "reasoning/answer_only_in_think", "reasoning/ngram_repetition",
                "reward/think_format", "reward/language_consistency", "reward/accuracy"):
        assert key in rows[0], key
    assert rows[0]["reasoning/length_mean"] == rows[0]["rollout/response_length_mean"]
    assert "reflection" in (out / "grpo" / "report.md").read_text() and (out / "grpo" / "curves.png").is_file()


def test_rejection_sampling_writes_sft_rows_with_provenance(r1_run):
    out, _ = r1_run
    rows = jsonl(out / "sample" / "data.jsonl")
    stats = json.loads((out / "sample" / "rejection.json").read_text())
    assert stats["candidates"] == 8 * 4 and stats["kept"] == len(rows) > 0
    assert stats["kept"] + sum(stats["rejected"].values()) == stats["candidates"]
    for row in rows:
        assert {"prompt", "response", "answer", "provenance"} <= set(row)
        assert row["provenance"]["policy"] == str(out / "grpo" / "policy")
        assert {"accuracy", "think_format", "language_consistency"} <= set(row["provenance"]["parts"])


def test_distillation_trains_a_smaller_student_on_the_samples(r1_run):
    out, _ = r1_run
    student = json.loads((out / "distill" / "student" / "config.json").read_text())
    policy = json.loads((out / "distill" / "policy" / "config.json").read_text())
    teacher = json.loads((out / "grpo" / "policy" / "config.json").read_text())
    assert student["num_hidden_layers"] == policy["num_hidden_layers"] == 1 < teacher["num_hidden_layers"]
    sft = json.loads((out / "distill" / "sft.json").read_text())
    assert sft["model"] == str(out / "distill" / "student")
    assert sft["val_loss_end"] < sft["val_loss_start"]


def test_a_second_start_skips_every_finished_stage(r1_run, cache_dir):
    out, _ = r1_run
    before = {name: (out / name / "DONE.json").stat().st_mtime_ns for name in STAGES}
    res = raygrpo(out, cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("finished earlier") == len(STAGES)
    assert "role     index" not in res.stdout  # nothing placed: nothing left to run, no Ray started
    assert {name: (out / name / "DONE.json").stat().st_mtime_ns for name in STAGES} == before
    assert "| distill |" in (out / "report.md").read_text()
