"""`raygrpo` entry point (Hydra): validate, read the data, start Ray, run the stage
(`orchestration/stages/`: train, eval, sft, distill, rejection_sampling) or the stages of a
pipeline (`stages/pipeline.py`).

User errors (bad config, missing model, a topology the cluster cannot hold, an unknown preset,
Hydra's own composition errors) print one line and exit with status 2 (`USER_ERROR`) before any
actor starts. `raygrpo scale ...` and `raygrpo export ...` are subcommands (orchestration/cluster/control.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from orchestration.config import ConfigError, register_configs, validate
from orchestration.preflight import check_overrides, check_run

log = logging.getLogger("raygrpo")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USER_ERROR = 2  # every user error (ours and Hydra's) exits with this status
_started = False  # the job function ran: a later exit status 1 is a crash, not a composition error

register_configs()


def importable_from_launch_dir() -> None:
    """Modules in the directory `raygrpo` is started from (a user's reward functions) import here,
    in the reward processes and in every local Ray worker."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # last: a user's `tasks.py` must not shadow our packages
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), cwd) if p)


def run(cfg: DictConfig) -> None:
    importable_from_launch_dir()
    validate(cfg)
    check_run(cfg)  # before the heavy imports below: a user error answers in a second or two
    import ray

    from orchestration import stages
    from orchestration.cluster import placement, plan
    from orchestration.config.stages import STAGES

    if cfg.stage == "pipeline":
        from orchestration.stages import pipeline

        pipeline.run(cfg)
        return
    prepared = stages.prepare(cfg)  # reads the data: unusable data stops the run before Ray starts
    roles = STAGES[cfg.stage].roles
    if cfg.dry_run and cfg.topology.plan_nodes:  # a cluster that is not there: plan only
        print(plan.describe_plan(cfg, roles))
        return
    placement.start_ray(cfg)
    try:
        if cfg.dry_run:
            print(placement.place(cfg, roles).describe(), flush=True)
            print("\n".join(plan.memory_lines(cfg)))
            return
        outcome = stages.run(cfg, prepared)
        if outcome.policy or outcome.data:
            print(f"run written to {Path(cfg.output_dir).resolve()}")
    finally:
        ray.shutdown()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    global _started
    _started = True
    from orchestration.cluster.control import RunStopped

    try:
        run(cfg)
    except ConfigError as err:
        print(f"raygrpo: error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR)
    except RunStopped as stop:
        print(f"raygrpo: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except (KeyboardInterrupt, Exception) as err:
        if not _fatal(err):
            raise  # a bug: Hydra prints the traceback
        from orchestration.train.checkpoint import Checkpoints

        newest = Checkpoints(cfg.output_dir).latest()
        resume = f"resume=auto continues from {newest}" if newest else "no checkpoint was written yet"
        what = "stopped at once" if isinstance(err, KeyboardInterrupt) else f"error: {err}; the run stopped"
        print(f"raygrpo: {what}; {resume}", file=sys.stderr)
        sys.exit(130 if isinstance(err, KeyboardInterrupt) else 1)


def _fatal(err: BaseException) -> bool:
    """A second Ctrl-C, a lost learner rank, a weight sync that failed twice: the run cannot go on
    and the message says where to resume (imported here: the user-error path stays light)."""
    if isinstance(err, KeyboardInterrupt):
        return True
    from learner.group import LearnerLost
    from orchestration.cluster.weight_sync import WeightSyncError

    return isinstance(err, (LearnerLost, WeightSyncError))


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in ("scale", "export"):
        from orchestration.cluster.control import command

        sys.exit(command(argv[0], argv[1:]))
    try:
        check_overrides(argv, CONF_DIR)
    except ConfigError as err:
        print(f"raygrpo: error: {err}", file=sys.stderr)
        sys.exit(USER_ERROR)
    try:
        _hydra_main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _started:  # Hydra could not compose the config: a user error
            sys.exit(USER_ERROR)
        raise


if __name__ == "__main__":
    main()
