"""Run logging: JSONL (always), W&B (offline by default), a progress bar, and step timers.

W&B's run directory lives inside the run's output directory. Only the resolved config and
metrics are logged; nothing from the environment (API keys stay out of every log).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class Timer:
    """Wall time per named phase of one step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def breakdown(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/other"] = max(0.0, total - sum(self.seconds.values()))
        out["time/step"] = total
        return out


class RunLogger:
    def __init__(self, output_dir: str, config: dict[str, Any], wandb_cfg: Any, total_steps: int, progress: bool,
                 resume_step: int | None = None, wandb_id: str | None = None, desc: str = "grpo"):
        """`resume_step`: a resumed run continues its logs (restored to the checkpoint) from this
        step, and its W&B run `wandb_id`; a fresh run replaces them, never mixes."""
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.append = resume_step is not None
        self.jsonl = open(self.dir / "metrics.jsonl", "a" if self.append else "w", buffering=1)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.wandb = None
        self.samples = None  # samples.jsonl, opened by the first table
        if wandb_cfg.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, mode=wandb_cfg.mode,
                                    dir=str(self.dir), name=config.get("experiment"), config=config,
                                    id=wandb_id, resume="allow" if wandb_id else None,
                                    settings=wandb.Settings(console="off", x_disable_stats=True))
        self.wandb_id = self.wandb.id if self.wandb is not None else None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step or 0, desc=desc, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], advance: bool = True) -> None:
        """Write one record; `advance` moves the progress bar (False for the final evaluation)."""
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.bar is not None:
            self.bar.update(int(advance))
            shown = {k.split("/")[-1]: record[k] for k in ("reward/mean", "eval/accuracy", "time/step") if k in record}
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A table of sample completions: `samples.jsonl` (a row each) and the W&B table `samples`."""
        if not rows:
            return
        if self.samples is None:
            self.samples = open(self.dir / "samples.jsonl", "a" if self.append else "w", buffering=1)
        for row in rows:
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            self.samples.write(json.dumps({"step": step, **clean}, default=str) + "\n")
        if self.wandb is not None:
            import wandb

            columns = list(dict.fromkeys(k for row in rows for k in row))
            data = [[_cell(row.get(k)) for k in columns] for row in rows]
            self.wandb.log({"samples": wandb.Table(columns=["step", *columns], data=[[step, *d] for d in data])},
                           step=step)

    def samples_bytes(self) -> int:
        """Length of samples.jsonl so far (what a checkpoint restores it to)."""
        path = self.dir / "samples.jsonl"
        return path.stat().st_size if (self.samples is not None or self.append) and path.exists() else 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
        if self.samples is not None:
            self.samples.close()


def _cell(value: Any) -> Any:
    """A W&B table cell: numbers and strings as they are, anything else as text."""
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def _plain(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
