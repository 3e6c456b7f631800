"""Ray start-up and placement: the one module that turns `topology` into actor options.

Each role (rollout, learner, reward) gets its own placement group of one bundle per actor, so
resources are reserved up front (or the run stops with a clear message) and the placement can be
printed before anything starts (`dry_run=true`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestration.config import ALL_ROLES as ROLES
from orchestration.config import ConfigError, role_bundle, validate_resources



def start_ray(cfg: Any) -> None:
    """Join `ray.address` (or RAY_ADDRESS), else start a local Ray bound to 127.0.0.1."""
    address = cfg.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    quiet = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    env = {"env_vars": quiet}  # engines' INFO logs would drown the progress bar
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    t = cfg.topology
    ray.init(num_cpus=t.num_cpus, num_gpus=t.num_gpus, include_dashboard=cfg.ray.dashboard,
             dashboard_host="127.0.0.1", runtime_env=env, log_to_driver=True)


def bundles(cfg: Any, role: str) -> list[dict[str, float]]:
    count, bundle = role_bundle(cfg, role)
    return [dict(bundle) for _ in range(count)]


@dataclass
class Placement:
    """Ray actor options per role and actor index, plus where each bundle landed."""

    options: dict[str, list[dict[str, Any]]]
    nodes: dict[str, list[str]]  # role -> node IP per actor

    def describe(self) -> str:
        lines = [f"{'role':<8} {'index':>5}  {'node':<16} resources"]
        for role in self.options:
            for i, (opt, node) in enumerate(zip(self.options[role], self.nodes[role])):
                res = {"CPU": opt["num_cpus"], "GPU": opt.get("num_gpus", 0), **opt.get("resources", {})}
                lines.append(f"{role:<8} {i:>5}  {node:<16} " + ", ".join(f"{k}={v:g}" for k, v in res.items() if v))
        return "\n".join(lines)


def place(cfg: Any, roles: tuple[str, ...] = ROLES, timeout_s: float = 60.0) -> Placement:
    """Reserve one placement group per role; raise ConfigError if the cluster cannot hold it."""
    validate_resources(cfg, ray.cluster_resources(), roles)
    node_ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    options, nodes = {}, {}
    for role in roles:
        spec = bundles(cfg, role)
        pg = placement_group(spec, strategy=cfg.topology.strategy, name=f"raygrpo-{role}")
        _wait_ready(pg, timeout_s)
        table = placement_group_table(pg)
        nodes[role] = [node_ip.get(table["bundles_to_node_id"][i], "?") for i in range(len(spec))]
        options[role] = [_actor_options(pg, i, b) for i, b in enumerate(spec)]
    return Placement(options, nodes)


def _wait_ready(pg, timeout_s: float) -> None:
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise ConfigError(f"placement group {pg.bundle_specs} could not be placed within {timeout_s:g} s "
                          f"(strategy or custom resources do not fit the cluster's nodes)")


def _actor_options(pg, index: int, bundle: dict[str, float]) -> dict[str, Any]:
    extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {
        "num_cpus": bundle["CPU"],
        "num_gpus": bundle.get("GPU", 0),
        **({"resources": extra} if extra else {}),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
    }
