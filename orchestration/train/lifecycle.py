"""A run's life between its steps: resume, checkpoints, stop signals, scale requests, and the
guard against a learner that keeps skipping updates. The training loop (`loop.train`) calls
`before_step` and `after_step`; everything that outlives one step goes through here.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

from orchestration.cluster.control import Control, RunStopped, StopFlag
from orchestration.train.checkpoint import (CheckpointError, Checkpoints, RunState, capture_rng, read_state,
                                            restore_rng, restore_run_files, write_driver_files)
from orchestration.train.producer import collect_evals

log = logging.getLogger("raygrpo")


class Lifecycle:
    def __init__(self, cfg: Any, config: dict[str, Any], resume_from: Path | None):
        """`resume_from`: the checkpoint chosen by `checkpoint.choose_resume` (None: a fresh run).
        Restores the run directory's logs and the driver's RNGs from it."""
        self.cfg, self.config = cfg, config
        self.run_dir = Path(cfg.output_dir).resolve()
        self.checkpoints = Checkpoints(self.run_dir, cfg.checkpoint.keep)
        self.resume_from = resume_from
        self.state = RunState()
        if resume_from is not None:
            self.state = read_state(resume_from)
            restore_run_files(resume_from, self.run_dir, self.state)
            restore_rng(self.state.rng)
        self.stop = StopFlag()
        self.control: Control | None = None
        self.actors = self.logger = None

    def attach(self, actors: Any, logger: Any) -> None:
        """The run's actors are up: check that the learner ranks write where the driver reads, bring a
        resumed learner and its engines to the checkpoint's weights, and start serving scale requests."""
        self.actors, self.logger = actors, logger
        self.checkpoints.check_shared(actors.learner.write_markers)  # before any step: refuse, don't lose shards
        if self.resume_from is not None:
            actors.learner.load_checkpoint(str(self.resume_from))
            with actors.handover():
                actors.sync.push(self.state.version)
            log.warning("resumed from %s: step %d, policy version %d", self.resume_from, self.state.step,
                        self.state.version)
        self.control = Control(self.run_dir)

    def before_step(self, step: int) -> None:
        """Apply a pending request to resize the rollout pool (takes effect at the next sync)."""
        self.control.apply(self.actors.rollout, step)

    def after_step(self, step: int, producer: Any, learner_metrics: dict[str, float] | None) -> None:
        """Count skipped updates; checkpoint when due, on a stop signal, or before stopping for
        repeated skips; raise RunStopped for the last two."""
        s, limit = self.state, self.cfg.learner.max_skipped_steps
        s.step = step + 1
        s.version = self.actors.sync.version
        skipped = bool(learner_metrics and learner_metrics.get("skipped_steps", 0) > 0)
        s.skipped_in_a_row = s.skipped_in_a_row + 1 if skipped else 0
        broken = s.skipped_in_a_row > limit
        every = self.cfg.checkpoint.every_n_steps
        if not (broken or self.stop.requested or (every and s.step % every == 0 and s.step < self.cfg.steps)):
            return
        where = self.save(producer)
        resume = f"checkpoint {where}; continue with resume=auto" if where else "no checkpoint could be written"
        if broken:
            raise RunStopped(f"the learner skipped {s.skipped_in_a_row} updates in a row for non-finite gradients "
                             f"(learner.max_skipped_steps={limit}): stopped after step {step}; {resume} after "
                             f"fixing the cause (learning rate, data, rewards)", 1)
        if self.stop.requested:
            name = signal.Signals(self.stop.signum).name
            raise RunStopped(f"stopped by {name} after step {step}; {resume}", 128 + self.stop.signum)

    def save(self, producer: Any) -> Path | None:
        """Write a checkpoint of everything up to `state.step` (waiting for productions and
        evaluations in flight, so nothing generated is lost); None when it fails (logged)."""
        s = self.state
        s.pending.update(collect_evals(producer, s.evals, wait=True))
        s.queued = producer.produced()
        s.wandb_id, s.samples_bytes, s.rng = self.logger.wandb_id, self.logger.samples_bytes(), capture_rng()

        def fill(directory: Path) -> None:
            self.actors.learner.save_checkpoint(str(directory))
            write_driver_files(directory, s, self.config, self.run_dir)

        try:
            where = self.checkpoints.write(s.step, fill)
        except CheckpointError as err:
            log.error("%s", err)
            return None
        finally:
            s.queued = {}
        log.warning("checkpoint written: %s", where)
        return where
