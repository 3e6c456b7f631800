"""`raygrpo` entry point (Hydra): validate, place, start actors, train, report.

User errors (bad config, missing model, a topology the cluster cannot hold) print one line and
exit with status 2 before any actor starts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from orchestration.config import ConfigError, register_configs, validate

log = logging.getLogger("raygrpo")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


def run(cfg: DictConfig) -> None:
    import ray

    from orchestration import cluster, driver
    from orchestration.models import resolve_model_path

    validate(cfg)
    cluster.start_ray(cfg)
    try:
        roles = ("rollout", "reward", "learner") if cfg.stage == "train" else ("rollout",)
        placement = cluster.place(cfg, roles)
        if cfg.dry_run:
            print(placement.describe())
            return
        model_path = resolve_model_path(cfg.model.path)
        if cfg.stage == "eval":
            driver.run_eval(cfg, placement, model_path)
        else:
            out = driver.run_train(cfg, placement, model_path)
            print(f"run written to {out.resolve()}")
    finally:
        ray.shutdown()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        print(f"raygrpo: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
