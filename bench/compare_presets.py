"""Run each algorithm preset on the same task, budget and seed, and plot their reward curves.

    python bench/compare_presets.py --steps 8 --out runs/presets [extra overrides...]

Each preset is one `raygrpo experiment=demo algo=<preset>` run (evaluation only at start and
end); prints a table of first/last reward and held-out accuracy and writes presets.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PRESETS = ["grpo", "dr_grpo", "dapo", "gspo", "rloo"]


def preset_overrides(preset: str) -> list[str]:
    """The preset's own values as command-line overrides: the demo experiment sets algo fields
    (kl_coef 0) that would otherwise mask the preset's."""
    from omegaconf import OmegaConf

    values = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "algo" / f"{preset}.yaml")
    return [f"algo.{k}={v}" for k, v in values.items()]


def run(preset: str, out: Path, steps: int, extra: list[str]) -> list[dict]:
    run_dir = out / preset
    cmd = [sys.executable, "-m", "orchestration", "experiment=demo", f"algo={preset}", *preset_overrides(preset),
           f"steps={steps}", f"output_dir={run_dir}", "logger.progress=false", "eval.every_n_steps=0",
           "eval.pass_k=1", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="runs/presets")
    ap.add_argument("--presets", nargs="*", default=PRESETS)
    args, extra = ap.parse_known_args()
    out = Path(args.out)
    curves = {}
    print(f"{'preset':<9} {'reward first':>12} {'reward last':>12} {'eval before':>12} {'eval after':>11} {'s/step':>7}")
    for preset in args.presets:
        rows = run(preset, out, args.steps, extra)
        train = [r for r in rows if "reward/mean" in r]
        evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        curves[preset] = [(r["step"], r["reward/mean"]) for r in train]
        step_s = sum(r["time/step"] for r in train) / len(train)
        print(f"{preset:<9} {train[0]['reward/mean']:>12.3f} {train[-1]['reward/mean']:>12.3f} "
              f"{evals[0]:>12.3f} {evals[-1]:>11.3f} {step_s:>7.1f}", flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for preset, points in curves.items():
        plt.plot(*zip(*points), marker="o", markersize=3, label=preset)
    plt.xlabel("step")
    plt.ylabel("reward/mean")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.savefig(out / "presets.png", dpi=110)
    (out / "curves.json").write_text(json.dumps(curves))


if __name__ == "__main__":
    main()
