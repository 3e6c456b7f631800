"""What a run leaves for people: curves.png, report.md, and the console summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PANELS = [
    ("reward", ["reward/mean", "reward/accuracy"]),
    ("held-out accuracy", ["eval/accuracy", "eval/pass@"]),  # a trailing "@" matches any k
    ("response length (tokens)", ["reasoning/length_mean", "reasoning/length_p50", "reasoning/length_p90"]),
    ("reflection", ["reasoning/reflection_rate", "reasoning/answer_only_in_think", "reasoning/ngram_repetition"]),
    ("KL / clip fraction", ["learner/kl_ref", "learner/approx_kl", "learner/clip_frac_low", "learner/clip_frac_high"]),
    ("step time (s)", ["time/generate", "time/reward", "time/learner", "time/sync", "time/other"]),
]


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


SFT_PANELS = [("loss", ["sft/train_loss", "sft/val_loss"]), ("gradient", ["learner/grad_norm"]),
              ("learning rate", ["learner/lr"])]


def plot_curves(rows: list[dict[str, Any]], path: Path, panels: list[tuple[str, list[str]]] = PANELS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for key in _matching(rows, keys):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _matching(rows: list[dict[str, Any]], patterns: list[str]) -> list[str]:
    """Metric names present in `rows` equal to a pattern, or prefixed by one ending in "@"."""
    names = dict.fromkeys(k for r in rows for k in r)
    return [k for k in names if any(k == p or (p.endswith("@") and k.startswith(p)) for p in patterns)]


def before_after(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, float, float]]:
    return [(k, before[k], after[k]) for k in sorted(before) if k in after]


def write_report(run_dir: Path, cfg: dict[str, Any], table, samples_before, samples_after, wall_s: float) -> Path:
    lines = [f"# raygrpo run: {cfg.get('experiment')}", "",
             f"Model `{cfg['model']['path']}`, {cfg['steps']} steps, {cfg['rollout']['prompts_per_step']} prompts "
             f"× {cfg['rollout']['group_size']} samples per step, wall time {wall_s / 60:.1f} min.", ""]
    if table:
        lines += ["## Held-out evaluation (test split, disjoint from training)", "",
                  "| metric | before | after | change |", "|---|---|---|---|"]
        lines += [f"| {k} | {b:.3f} | {a:.3f} | {a - b:+.3f} |" for k, b, a in table]
        lines += [""]
    lines += ["![curves](curves.png)  ", "Reward, held-out accuracy, response length (mean, p50, p90), reflection "
              "(share of replies with a reflection marker; answers only inside the think block; 4-gram "
              "repetition), KL and clipping, step time, by step.", ""]
    if samples_after:
        lines += ["## Sample greedy replies (same held-out prompts)", ""]
    for before, after in zip(samples_before, samples_after):
        lines += [f"**{before['prompt']}** (answer {before['answer']})", "",
                  f"- before ({'✓' if before['correct'] else '✗'}): `{_one_line(before['reply'])}`",
                  f"- after ({'✓' if after['correct'] else '✗'}): `{_one_line(after['reply'])}`", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def print_summary(table, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="held-out evaluation")
    for col in ("metric", "before", "after", "change"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for k, b, a in table:
        t.add_row(k, f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}")
    console = Console()
    console.print(t)
    for name in ("policy", "metrics.jsonl", "curves.png", "report.md", "wandb"):
        console.print(f"  {name:<14} {run_dir / name}")


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + "…"
