"""Step time of a real run, by phase: the synchronous loop against `rollout.max_staleness=1`, in
one invocation on one machine. Prints one JSON line; asserts nothing.

    .venv/bin/python bench/step.py --experiment demo --steps 6 [--set key=value ...]

The asynchronous run gives engine and learner one core each (`--async-set`) on a 2-core machine;
the synchronous one keeps the experiment's topology. Each mode runs `raygrpo experiment=<experiment> steps=N eval.enabled=false` in a subprocess and
reads its metrics.jsonl; figures are medians over the steps after the first (warm-up). Figures:
  sync.phases             median seconds of generate, reward, learner, sync, step
  sync.overhead_frac      (step − generate − reward − learner − sync) / step: the orchestration's
                          own cost in the synchronous loop
  async.step_over_bound   step time with max_staleness=1 / max(generate, learner): 1.0 would be
                          perfect overlap (generation and training measured in the same run)
  async_over_sync         step time ratio, < 1 is faster
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("generate", "reward", "learner", "sync", "wait_rollout", "step")


def run(experiment: str, steps: int, staleness: int, extra: list[str], out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "orchestration", f"experiment={experiment}", f"steps={steps}",
           "eval.enabled=false", "logger.progress=false", "logger.wandb.mode=disabled",
           f"rollout.max_staleness={staleness}", f"output_dir={out}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def medians(rows: list[dict]) -> dict[str, float]:
    steady = [r for r in rows if "time/step" in r][1:] or rows
    return {p: round(statistics.median(r.get(f"time/{p}", 0.0) for r in steady), 3) for p in PHASES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", default="demo")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for both runs")
    ap.add_argument("--async-set", nargs="*", default=["topology.rollout_cpus=1", "topology.learner_cpus=1"],
                    help="overrides for the max_staleness=1 run only (default: engine and learner one core each)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        sync = medians(run(args.experiment, args.steps, 0, args.set, Path(tmp) / "sync"))
        ahead = medians(run(args.experiment, args.steps, 1, args.set + args.async_set, Path(tmp) / "async"))
    busy = sync["generate"] + sync["reward"] + sync["learner"] + sync["sync"]
    bound = max(ahead["generate"], ahead["learner"])
    print(json.dumps({
        "bench": "step", "experiment": args.experiment, "steps": args.steps, "overrides": args.set,
        "async_overrides": args.async_set,
        "sync": {"phases": sync, "overhead_frac": round((sync["step"] - busy) / sync["step"], 4)},
        "async": {"phases": ahead, "step_over_bound": round(ahead["step"] / bound, 3)},
        "async_over_sync": round(ahead["step"] / sync["step"], 3),
    }))


if __name__ == "__main__":
    main()
