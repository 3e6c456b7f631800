"""End to end on the user's own data, colocated: the smoke topology (2 engines, 2 learner ranks, in
pairs on shared bundles: engines sleep while the learner trains, the learner offloads while they
generate — no-ops on CPU — and weights move through shared memory) trained on a small JSONL file
(with bad rows, chat prompts and a metadata column), a custom reward given on the command line,
held-out evaluation on a val file, and the samples table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROWS = [
    {"prompt": "What is 1 + 1?", "answer": "2", "level": 1},
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5", "level": 2},
    {"prompt": "What is 4 + 4?", "answer": 8, "level": 3},
    {"prompt": "What is 5 - 2?", "answer": "3", "level": 4},
    {"prompt": "What is 9 - 9?", "answer": "0", "level": 5},
    {"prompt": "What is 3 + 4?", "answer": "7", "level": 6},
]
CUSTOM = "tests.reward_fixtures.with_metadata"


@pytest.mark.slow
def test_smoke_run_on_a_jsonl_file(tmp_path, cache_dir):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]) + "{oops\n" + '{"prompt": "no answer"}\n'
                     + "".join(json.dumps(r) + "\n" for r in ROWS[3:]))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYGRPO_CACHE"] = cache_dir
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration", "experiment=smoke", f"output_dir={out}", "logger.progress=false",
         f"data.train_files=[{train}]", f"data.val_files=[{val}]", f"+reward.functions={{{CUSTOM}: 0.01}}",
         "logger.samples_every_n_steps=1", "logger.samples_prompts=1", "eval.pass_k=1", "topology.colocate=true"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.jsonl: skipped 2 bad rows (line 4: not valid JSON" in proc.stdout  # Hydra logs to stdout

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 6 rows, 4 prompts a step, 1 epoch: the data ends the run after 2 of the smoke's 3 steps
    assert [r["step"] for r in rows] == [0, 1, 2] and "reward/mean" not in rows[2]
    assert rows[0]["data/skipped_rows"] == 2 and rows[0]["data/train_rows"] == 6 and "data/skipped_rows" not in rows[1]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2]
    assert all(r["learner/logprob_mismatch"] < 1e-3 for r in rows[:2])  # weights arrived through shared memory
    placement = json.loads((out / "placement.json").read_text())
    assert placement["rollout"][0]["resources"] == {"CPU": 1.0} == placement["learner"][0]["resources"]
    assert json.loads((out / "config.json").read_text())["topology"]["colocate"] is True
    assert 0 < rows[0][f"reward/{CUSTOM}"] <= 6  # the metadata column reached the user's reward

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 1] and len(samples) == 2 * 4  # 1 prompt × G=4 per step
    by_prompt = {r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]: r for r in ROWS}
    for s in samples:
        row = by_prompt[s["prompt"]]
        assert s["answer"] == str(row["answer"]) and s[CUSTOM] == row["level"] and s["status"] == "ok"
        assert s["source"].startswith("train.jsonl:")
        assert {"completion", "reward", "digits", "policy_version", "finish_reason"} <= set(s)
    assert [s["policy_version"] for s in samples] == [0] * 4 + [1] * 4
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 2, list((out / "wandb").rglob("*.json"))
