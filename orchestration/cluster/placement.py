"""Ray start-up and placement: the one module that turns `topology` into actor options.

Each role (rollout, learner, reward) gets its own placement group of one bundle per actor, so
resources are reserved up front (or the run stops with a clear message) and the placement can be
printed before anything starts (`dry_run=true`). Rollout engines added during a run (growth beyond
the initial slots) get a placement group each from `extra_rollout_slot`.

A local Ray (no `ray.address`) listens on loopback only and authenticates every client with a token
made for that cluster (`start_local_ray`); a cluster the user names is joined with its own settings.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray._private import ray_constants
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.files import write_secret
from orchestration.cluster.plan import role_bundle, tp_engine_bundles, validate_resources
from orchestration.config import ConfigError
from orchestration.config.stages import ROLES

log = logging.getLogger("raygrpo")
LOOPBACK = "127.0.0.1"


def start_ray(cfg: Any) -> None:
    """Join `ray.address` (or RAY_ADDRESS), else start a local Ray on loopback with token auth; then
    check that its GPU nodes can use their GPUs (when the topology asks for any)."""
    address = cfg.ray.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    env = {"env_vars": {k: v for k, v in worker_env().items() if k not in job_env_vars()}}
    if address:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except ConnectionError as err:  # a host that accepts TCP but is no Ray cluster, or a client timeout
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {err}") from None
    else:
        t = cfg.topology
        start_local_ray(num_cpus=t.num_cpus, num_gpus=t.num_gpus, include_dashboard=cfg.ray.dashboard,
                        runtime_env=env, log_to_driver=True)
    check_gpu_nodes(cfg)


def check_gpu_nodes(cfg: Any, probe: Callable[[], list[tuple[str, str | None]]] | None = None) -> None:
    """With GPU roles, every GPU node of the cluster can use its GPUs (torch's CUDA against the
    node's driver: `common.gpu.cuda_problem`), else ConfigError naming the node, before any actor."""
    t = cfg.topology
    if not (t.rollout_gpus or t.learner_gpus):
        return
    bad = [(node, why) for node, why in (probe or _probe_gpu_nodes)() if why]
    if bad:
        node, why = bad[0]
        more = f" (and {len(bad) - 1} more node(s))" if len(bad) > 1 else ""
        raise ConfigError(f"GPU node {node}{more}: {why}")


def _probe_gpu_nodes() -> list[tuple[str, str | None]]:
    """(node IP, cuda_problem()) from a tiny task on each alive node that has GPUs."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from common.gpu import cuda_problem

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0]
    task = ray.remote(cuda_problem)
    refs = [task.options(num_cpus=0, num_gpus=0.01,  # a share of one GPU: the task sees that GPU
                         scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    try:
        return list(zip([n["NodeManagerAddress"] for n in nodes], ray.get(refs, timeout=120)))
    except ray.exceptions.GetTimeoutError:  # every GPU busy with other jobs: placement will say so
        log.warning("GPU check skipped: no GPU share free on some node within 120 s")
        return []


def start_local_ray(**init_args: Any) -> None:
    """`ray.init(**init_args)` for a new single-node cluster whose every process listens on 127.0.0.1
    only (GCS, raylet, object manager, workers, agents, metrics, dashboard) and requires the
    cluster's token from every client (`use_cluster_token`)."""
    use_cluster_token()
    with loopback_kept():
        ray.init(_node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **init_args)
    node_ip = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node_ip).is_loopback:  # fail closed if a Ray upgrade changes that mapping
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not on loopback: refusing to run on it")


@contextlib.contextmanager
def loopback_kept():
    """Within: Ray keeps 127.0.0.1 as this node's address, and a cluster address 127.0.0.1:port as it is.

    Ray 2.60 maps 127.0.0.1 to the machine's outward address (so a local cluster's servers listen on
    every interface, and a client of one on loopback dials the outward address), unless it runs in
    the single-node mode it uses on macOS and Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at
    import): then the node IP stays 127.0.0.1 and each server binds to it. Switched around one
    `ray.init` only: Ray's own processes get the node IP on their command line, and a process that
    later joins a real cluster must still find its outward address."""
    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def is_loopback_address(address: str | None) -> bool:
    """Whether a Ray address (host:port) names the host Ray remaps (127.0.0.1, localhost, ::1), as
    a local raygrpo Ray's does; other loopback addresses (127.0.0.2, ...) Ray keeps as they are."""
    return (address or "").rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "localhost", "::1")


def use_cluster_token() -> None:
    """Token authentication for the local cluster about to start, with the user's token when one is
    set (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), else a fresh one for this cluster alone.

    The fresh token lives in a 0600 file in a private directory removed at exit; only its path goes
    into the environment every Ray process inherits (RAY_AUTH_TOKEN_PATH), so reading a process's
    environment does not reveal it. Ray's own default, ~/.ray/auth_token, is not used: it is one
    token for every cluster of the user, kept forever, written with the umask's mode (0644 here).
    The token is never printed; `control.json` records the path for `raygrpo scale`."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: a local Ray started by raygrpo always authenticates", mode)
        del os.environ["RAY_AUTH_MODE"]  # unset: ray.init() of a new cluster turns token auth on itself
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    folder = tempfile.mkdtemp(prefix="raygrpo-ray-")  # mode 0700
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "auth_token")
    write_secret(path, secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()  # a token looked up earlier in this process


def worker_env() -> dict[str, str]:
    """Environment of every actor of the job (through the runtime env, so joined clusters get it too)."""
    return {
        # Ray >= 2.5x leaves CUDA_VISIBLE_DEVICES alone for zero-GPU actors, so a CPU-configured
        # role would see (and might use) every GPU of its node; "1" restores the empty list.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
        # A timed-out NCCL collective raises (and aborts its communicator) instead of the default
        # watchdog killing the process, so a lost engine mid-sync is a WeightSyncError.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),  # INFO drowns the progress bar
    }


def job_env_vars() -> dict[str, str]:
    """Variables a submitted job's runtime env already sets: Ray refuses to merge a key twice."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def bundles(cfg: Any, role: str) -> list[dict[str, float]]:
    count, bundle = role_bundle(cfg, role)
    return [dict(bundle) for _ in range(count)]


@dataclass
class Placement:
    """Ray actor options per role and actor index, where each landed, and what each reserved."""

    options: dict[str, list[dict[str, Any]]]
    nodes: dict[str, list[str]]  # role -> node IP per actor
    reserved: dict[str, list[dict[str, float]]]  # role -> resources per actor (all its bundles)
    engine_bundles: list[list[int]]  # per rollout actor: its TP workers' bundles ([] for TP 1)

    def describe(self) -> str:
        lines = [f"{'role':<8} {'index':>5}  {'node':<16} resources"]
        for role in self.options:
            for i, (res, node) in enumerate(zip(self.reserved[role], self.nodes[role])):
                lines.append(f"{role:<8} {i:>5}  {node:<16} " + ", ".join(f"{k}={v:g}" for k, v in res.items() if v))
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        """Where every actor runs, as JSON: {role: [{node, resources}]} (the run's record of placement)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {role: [{"node": node, "resources": res} for node, res in zip(self.nodes[role], self.reserved[role])]
                  for role in self.options}
        path.write_text(json.dumps(record, indent=1))

    def release(self) -> None:
        """Remove the placement groups (Ray stops the actors still in them): the next stage of a
        pipeline places its own."""
        from ray.util.placement_group import remove_placement_group

        groups = {id(o["scheduling_strategy"].placement_group): o["scheduling_strategy"].placement_group
                  for opts in self.options.values() for o in opts}
        for pg in groups.values():
            remove_placement_group(pg)


def place(cfg: Any, roles: tuple[str, ...] = ROLES, timeout_s: float = 60.0) -> Placement:
    """Reserve placement groups (one per role; one per engine for tensor-parallel engines; one for
    colocated engine/learner pairs) before any actor starts; raise ConfigError if the cluster
    cannot hold them."""
    validate_resources(cfg, ray.cluster_resources(), roles)
    node_ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    placement = Placement({}, {}, {}, [])
    colocated = cfg.topology.colocate and {"rollout", "learner"} <= set(roles)
    if colocated:
        _place_colocated(cfg, placement, node_ip, timeout_s)
    for role in roles:
        if colocated and role in ("rollout", "learner"):
            continue
        if role == "rollout" and cfg.rollout.tensor_parallel_size > 1:
            _place_tp_engines(cfg, placement, node_ip, timeout_s)
            continue
        spec = bundles(cfg, role)
        pg = _reserve(spec, cfg.topology.strategy, f"raygrpo-{role}", timeout_s)
        placement.nodes[role] = [node_ip.get(n, "?") for n in _bundle_nodes(pg, len(spec))]
        placement.options[role] = [_actor_options(pg, i, b) for i, b in enumerate(spec)]
        placement.reserved[role] = spec
        if role == "rollout":
            placement.engine_bundles = [[] for _ in spec]
    return placement


def extra_rollout_slot(cfg: Any) -> Callable[[int], tuple[dict[str, Any], list[int]]] | None:
    """`more(slot)` for `RolloutPool.start`: a fresh placement group for one engine beyond the initial
    ones — one bundle of the rollout role's spec, or with tensor parallelism the engine's own
    STRICT_PACK group as in `_place_tp_engines`. `more` returns (Ray actor options, engine bundles)
    without waiting: the actor starts once its group is placed (the pool's start deadline covers a
    group that never is). None with `topology.colocate`: engine i pairs with learner rank i, so a
    colocated pool has no extra slots (a replacement reuses its dead engine's slot)."""
    if cfg.topology.colocate:
        return None

    def more(slot: int) -> tuple[dict[str, Any], list[int]]:
        if cfg.rollout.tensor_parallel_size > 1:
            spec = tp_engine_bundles(cfg)
            pg = placement_group(spec, strategy="STRICT_PACK", name=f"raygrpo-rollout-{slot}")
            return _tp_engine_options(pg), list(range(len(spec)))
        _, bundle = role_bundle(cfg, "rollout")
        pg = placement_group([dict(bundle)], strategy="PACK", name=f"raygrpo-rollout-{slot}")
        return _actor_options(pg, 0, bundle), []

    return more


def _place_tp_engines(cfg: Any, placement: Placement, node_ip: dict[str, str], timeout_s: float) -> None:
    """Each engine gets its own STRICT_PACK group (its TP workers on one node, no engine sharing
    bundles); the engine actor itself holds nothing and captures the group for vLLM's workers."""
    spec = tp_engine_bundles(cfg)
    placement.options["rollout"], placement.nodes["rollout"], placement.reserved["rollout"] = [], [], []
    for i in range(cfg.rollout.num_actors):
        pg = _reserve(spec, "STRICT_PACK", f"raygrpo-rollout-{i}", timeout_s)
        placement.nodes["rollout"].append(node_ip.get(_bundle_nodes(pg, 1)[0], "?"))
        placement.options["rollout"].append(_tp_engine_options(pg))
        placement.reserved["rollout"].append({k: sum(b.get(k, 0.0) for b in spec) for k in spec[0]})
        placement.engine_bundles.append(list(range(len(spec))))


def _tp_engine_options(pg) -> dict[str, Any]:
    """The TP engine actor holds nothing itself; it captures its group for vLLM's workers."""
    return {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}


def _place_colocated(cfg: Any, placement: Placement, node_ip: dict[str, str], timeout_s: float) -> None:
    """One bundle per (engine i, learner rank i): both actors in it, sharing its GPU (if any)."""
    _, engine = role_bundle(cfg, "rollout")
    _, rank = role_bundle(cfg, "learner")
    pair = {k: engine.get(k, 0.0) + rank.get(k, 0.0) for k in {**engine, **rank}}
    if "GPU" in pair:
        pair["GPU"] = 1.0  # a whole GPU per pair: no two pairs (two NCCL learner ranks) on one device
    spec = [dict(pair) for _ in range(cfg.rollout.num_actors)]
    pg = _reserve(spec, cfg.topology.strategy, "raygrpo-colocated", timeout_s)
    where = [node_ip.get(n, "?") for n in _bundle_nodes(pg, len(spec))]
    for role, bundle in (("rollout", engine), ("learner", rank)):
        placement.options[role] = [_actor_options(pg, i, bundle) for i in range(len(spec))]
        placement.nodes[role] = list(where)
        placement.reserved[role] = [dict(bundle) for _ in spec]
    placement.engine_bundles = [[] for _ in spec]


def _reserve(spec: list[dict[str, float]], strategy: str, name: str, timeout_s: float):
    pg = placement_group(spec, strategy=strategy, name=name)
    _wait_ready(pg, timeout_s)
    return pg


def _bundle_nodes(pg, count: int) -> list[str]:
    table = placement_group_table(pg)
    return [table["bundles_to_node_id"][i] for i in range(count)]


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
