"""End to end: `raygrpo experiment=smoke` (tiny model, 2 rollout actors, 1 reward worker,
2 learner ranks, 3 steps) as a user runs it, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REQUIRED = [
    "reward/mean", "reward/std", "reward/accuracy", "reward/failed", "reward/zero_variance_groups",
    "rollout/response_length_mean", "rollout/response_length_max", "rollout/truncated",
    "learner/clip_frac_low", "learner/clip_frac_high", "learner/approx_kl", "learner/kl_ref",
    "learner/entropy", "learner/grad_norm", "learner/lr", "learner/logprob_mismatch",
    "perf/tokens_per_s", "time/generate", "time/reward", "time/learner", "time/sync", "time/other",
]


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path, cache_dir):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYGRPO_CACHE"] = cache_dir
    proc = subprocess.run([sys.executable, "-m", "orchestration", "experiment=smoke", f"output_dir={out}",
                           "logger.progress=false"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # 3 training steps, then the final evaluation
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[3] and "reward/mean" not in rows[3]
    rows = rows[:3]
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        assert row["learner/logprob_mismatch"] < 1e-3  # engines sample from the learner's weights
    assert rows[-1]["rollout/policy_version"] == 2  # step 2 sampled from the weights of step 1
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert (out / "curves.png").stat().st_size > 10_000 and "| eval/accuracy |" in (out / "report.md").read_text()

    # The engines' last reported checksums equal those of the saved final policy, packed the same way.
    from transformers import AutoModelForCausalLM

    from learner.weights import TensorSpec, checksum, checksums_match, pack, plan_buckets

    sync = json.loads((out / "sync.json").read_text())
    assert sync["version"] == 3
    model = AutoModelForCausalLM.from_pretrained(out / "policy", dtype=torch.float32)
    params = dict(model.named_parameters())
    specs = [TensorSpec(n, tuple(p.shape)) for n, p in params.items()]
    sums = [checksum(pack([params[s.name].detach() for s in b], sum(s.numel for s in b), torch.float32, "cpu"))
            for b in plan_buckets(specs, sync["bucket_bytes"], 4)]
    assert checksums_match(sums, [tuple(x) for x in sync["engine_checksums"]])
    initial = AutoModelForCausalLM.from_pretrained(Path(cache_dir) / "models" / "tiny-qwen2", dtype=torch.float32)
    assert any(not torch.equal(p, params[n]) for n, p in initial.named_parameters())  # it trained
