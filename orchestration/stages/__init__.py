"""What one `raygrpo stage=...` run does, on one set of actor types; a pipeline runs several in turn.

The stages, their actors, what they read and write: the one table, `orchestration.config.stages`.

`prepare` reads the user's files before Ray starts (unusable data: one line, exit 2); `run`
places the stage's actors, runs it and releases its placement groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.config.stages import STAGES

log = logging.getLogger("raygrpo")


@dataclass
class Prepared:
    task: Any = None  # the prompts (train, eval, rejection_sampling)
    resume_from: Path | None = None  # the checkpoint a train stage continues from
    sft: Any = None  # the rows of sft / distill


@dataclass
class Outcome:
    policy: Path | None = None  # the trained policy (HF directory)
    data: Path | None = None  # the data set written
    metrics: dict[str, float] | None = None  # an evaluation's


def prepare(cfg: Any) -> Prepared:
    """Read the stage's data (and choose a train stage's checkpoint) before Ray starts."""
    if cfg.stage in ("sft", "distill"):
        from orchestration.stages import sft

        return Prepared(sft=sft.prepare(cfg))
    from orchestration.train.checkpoint import choose_resume
    from tasks import make_task

    task = make_task(cfg)  # reads the data files: unusable data stops the run before Ray starts
    if cfg.stage != "train":
        return Prepared(task)
    limit = task.max_steps(cfg.rollout.prompts_per_step)
    if limit is not None and limit < cfg.steps:
        log.warning("data.epochs=%d over %d rows ends the run after %d steps (steps=%d)", cfg.data.epochs,
                    task.stats()["data/train_rows"], limit, cfg.steps)
        cfg.steps = limit
    return Prepared(task, None if cfg.dry_run else choose_resume(cfg))


def run(cfg: Any, prepared: Prepared) -> Outcome:
    """Place the stage's actors (Ray is up) and run the stage, which stops the actors it started
    (`launch.Actors.shutdown`) however it ends; then release its placement."""
    from common.models import resolve_model_path
    from orchestration.cluster.placement import place
    from orchestration.train import loop

    placement = place(cfg, STAGES[cfg.stage].roles)
    print(placement.describe(), flush=True)
    try:
        placement.save(Path(cfg.output_dir) / "placement.json")
        resolve_model_path(cfg.model.path)  # builds a built-in once here; each actor resolves it on its node
        if cfg.stage == "eval":
            return Outcome(metrics=loop.run_eval(cfg, placement, prepared.task))
        if cfg.stage == "train":
            return Outcome(policy=loop.run_train(cfg, placement, prepared.task, prepared.resume_from) / "policy")
        if cfg.stage == "rejection_sampling":
            from orchestration.stages import rejection

            return Outcome(data=rejection.run(cfg, placement, prepared.task))
        from orchestration.stages import sft

        return Outcome(policy=sft.run_sft(cfg, placement, prepared.sft))
    finally:
        placement.release()
