"""Operating a run from outside, as an attacker on the cluster would try it: the `ControlActor`
refuses wrong-typed, out-of-range and token-less requests (and the run goes on, the pool
untouched); the run token is a 0600 file that appears in no record and no log; `raygrpo scale`
needs it; and a local Ray started by raygrpo listens on loopback only and refuses clients without
its token."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest

from orchestration.cluster.control import (MAX_REFUSALS, NAMESPACE, TOKEN_FILE, Control, ControlActor, command, scale,
                                   token_digest)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "the-run-token"
BAD_ROLLOUTS = ["abc", "2", 2.5, True, False, None, [2], 0, -1, 10**9, 10**100]
BAD_TOKENS = [None, "", "wrong", TOKEN + "x", TOKEN.upper(), 123, b"the-run-token", "x" * 10_000, "\ud800"]


class FakePool:
    """A rollout pool that records resizes (and can be told to fail one)."""

    def __init__(self, target: int = 1, fail: Exception | None = None):
        self.target, self.actors, self.resizes, self.fail = target, [object()] * target, [], fail

    def resize(self, n: int) -> None:
        self.resizes.append(n)
        if self.fail:
            raise self.fail
        self.target, self.actors = n, [object()] * n


def test_the_actor_refuses_bad_requests_and_keeps_a_valid_one():
    actor = ControlActor(token_digest(TOKEN))
    actor.report({"step": 3}, TOKEN)
    assert actor.scale(3, TOKEN) == {"accepted": True, "status": {"step": 3}}
    for bad in BAD_ROLLOUTS:
        answer = actor.scale(bad, TOKEN)
        assert answer["accepted"] is False and "rollout must be" in answer["error"], (bad, answer)
    for bad in BAD_TOKENS:
        answer = actor.scale(2, bad)
        assert answer == {"accepted": False, "error": answer["error"]} and "run token" in answer["error"], bad
    requested, refusals = actor.take(TOKEN)
    assert requested == 3  # the valid request before them is still the one pending
    assert len(refusals) == len(BAD_ROLLOUTS) + len(BAD_TOKENS)
    assert "got str" in refusals[0] and "abc" not in refusals[0]  # a caller's string is never echoed
    assert "got bool" in refusals[3] and "got 1000000000" in refusals[9] and "a larger number" in refusals[10]
    assert actor.take(TOKEN) == (None, [])
    assert actor.scale(2, TOKEN)["accepted"] and actor.take(TOKEN) == (2, [])


def test_the_drivers_methods_need_the_token_too():
    actor = ControlActor(token_digest(TOKEN))
    actor.scale(2, TOKEN)
    for bad in BAD_TOKENS:
        with pytest.raises(PermissionError):
            actor.take(bad)  # a stranger can neither swallow a pending request...
        with pytest.raises(PermissionError):
            actor.report({"step": 99}, bad)  # ...nor fake the status callers read
    assert actor.take(TOKEN) == (2, []) and actor.status == {}


def test_a_flood_of_refusals_is_counted_not_kept():
    actor = ControlActor(token_digest(TOKEN))
    for _ in range(MAX_REFUSALS + 500):
        actor.scale("abc", "wrong")
    _, refusals = actor.take(TOKEN)
    assert len(refusals) == MAX_REFUSALS + 1 and refusals[-1] == "500 more refused requests not kept"


def test_scale_checks_its_arguments_before_any_ray(tmp_path, capsys):
    for bad in (0, -1, 10**9, True, "2"):
        with pytest.raises(ValueError, match="rollout must be"):
            scale(bad, run=str(tmp_path))
    with pytest.raises(ValueError, match="run=<output_dir> is needed"):
        scale(2)
    assert command("scale", ["rollout=2"]) == 2
    assert "missing argument 'run'" in capsys.readouterr().err
    assert command("scale", ["rollout=abc", f"run={tmp_path}"]) == 2
    assert command("scale", ["rollout=2", f"run={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert (f"cannot read {tmp_path}/control.token: No such file or directory (only the user who started the "
            f"run can scale it)") in err


def cli_scale(run: Path, rollout: str) -> subprocess.CompletedProcess:
    """`raygrpo scale` from a fresh shell: the cluster's token path and auth mode come from control.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "orchestration", "scale", f"rollout={rollout}", f"run={run}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_running_control_refuses_strangers_and_the_run_goes_on(ray_local, tmp_path, caplog):
    ray = ray_local
    run = tmp_path / "run"
    run.mkdir()
    caplog.set_level(logging.WARNING, logger="raygrpo")
    control = Control(run)
    try:
        token_path = run / TOKEN_FILE
        assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
        token = token_path.read_text()
        assert len(token) >= 40 and token not in (run / "control.json").read_text()
        handle = ray.get_actor(control.name, namespace=NAMESPACE)  # what any client of the cluster can do
        pool = FakePool()
        for bad in BAD_ROLLOUTS:
            assert not ray.get(handle.scale.remote(bad, token))["accepted"]
        assert not ray.get(handle.scale.remote(2))["accepted"]
        assert not ray.get(handle.scale.remote(2, "wrong"))["accepted"]
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(handle.take.remote("wrong"))
        control.apply(pool, step=0)
        assert pool.resizes == [] and pool.target == 1
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused scale request: ")]
        assert len(refused) == len(BAD_ROLLOUTS) + 2, refused

        assert ray.get(handle.scale.remote(2, token))["accepted"]
        control.apply(pool, step=1)
        assert pool.resizes == [2] and pool.target == 2

        failing = FakePool(fail=RuntimeError("no placement for engine 2"))
        ray.get(handle.scale.remote(2, token))
        control.apply(failing, step=2)  # a resize that raises is logged; the run goes on
        assert failing.resizes == [2] and "scale request ignored: RuntimeError: no placement" in caplog.text

        done = cli_scale(run, "3")  # the real command, as the run's owner
        assert done.returncode == 0, done.stderr[-2000:]
        assert "'step': 2" in done.stdout and "'rollout_actors': 1" in done.stdout  # the last reported status
        control.apply(pool, step=3)
        assert pool.resizes == [2, 3]

        stranger = tmp_path / "stranger"  # a copy of control.json, but not the token
        stranger.mkdir()
        (stranger / "control.json").write_text((run / "control.json").read_text())
        (stranger / TOKEN_FILE).write_text("a guess")
        done = cli_scale(stranger, "4")
        assert done.returncode == 2 and "the run refused the request: missing or wrong run token" in done.stderr
        control.apply(pool, step=4)
        assert pool.resizes == [2, 3]

        assert token not in caplog.text
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        leaked = [p.name for p in logs.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
        assert not leaked, leaked
    finally:
        control.close()


def ray_processes() -> list[psutil.Process]:
    """This session's Ray: processes under this test process named like Ray's (or run from its session dir)."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() in ("gcs_server", "raylet") or p.name().startswith("ray::") or session in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_the_local_ray_listens_on_loopback_only(ray_local):
    listening = {}
    for p in ray_processes():
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    listening[f"{c.laddr.ip}:{c.laddr.port}"] = p.name()
        except psutil.NoSuchProcess:
            continue
    assert {"gcs_server", "raylet"} <= set(listening.values()), listening
    outward = {}
    for where, name in listening.items():
        ip = ipaddress.ip_address(where.rsplit(":", 1)[0])
        if not (ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)):
            outward[where] = name
    assert not outward, outward
    node = ray_local.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1" and ray_local.get_runtime_context().gcs_address.startswith(
        "127.0.0.1:")


def test_the_local_ray_refuses_clients_without_its_token(ray_local):
    from ray._raylet import AuthenticationTokenLoader
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, node_manager_pb2, node_manager_pb2_grpc

    right = [(k.lower(), v) for k, v in AuthenticationTokenLoader.instance().get_token_for_http_header().items()]
    gcs = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(
        ray_local.get_runtime_context().gcs_address))
    raylet = node_manager_pb2_grpc.NodeManagerServiceStub(grpc.insecure_channel(
        f"127.0.0.1:{ray_local.nodes()[0]['NodeManagerPort']}"))
    calls = [lambda md: gcs.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=md, timeout=10),
             lambda md: raylet.GetNodeStats(node_manager_pb2.GetNodeStatsRequest(), metadata=md, timeout=10)]
    for call in calls:
        for wrong in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as refused:
                call(wrong)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call(right)  # the same call with the cluster's token is answered
    # the cluster's own token (not Ray's shared ~/.ray/auth_token): a 0600 file only its path points to
    assert os.environ["RAY_AUTH_MODE"] == "token"
    path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert "RAY_AUTH_TOKEN" not in os.environ


class EngineCoreStandIn:
    """What a tensor-parallel engine's actor does before vLLM starts its engine-core process, on a
    node where the driver's token file is not (its path points nowhere here)."""

    def start_engine_core(self, pass_ray: bool) -> dict:
        from actors.rollout import pass_ray_to_engine_core

        driver_path = os.environ["RAY_AUTH_TOKEN_PATH"]
        os.environ["RAY_AUTH_TOKEN_PATH"] = driver_path + ".not-on-this-node"
        folder = pass_ray_to_engine_core() if pass_ray else None
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        mode = (stat.S_IMODE(os.stat(path).st_mode), stat.S_IMODE(os.stat(folder).st_mode)) if folder else None
        probe = "import ray; ray.init(); print(ray.get_runtime_context().gcs_address); ray.shutdown()"
        try:
            res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
            rc, out, err = res.returncode, res.stdout.strip(), res.stderr[-2000:]
        except subprocess.TimeoutExpired:
            rc, out, err = None, "", "timed out"
        finally:
            os.environ["RAY_AUTH_TOKEN_PATH"] = driver_path
        return dict(driver_path=driver_path, path=path, mode=mode, rc=rc, out=out, err=err,
                    env_has_token="RAY_AUTH_TOKEN" in os.environ)


def test_an_engine_core_process_joins_this_cluster_with_the_token_passed_on_its_node(ray_local):
    """vLLM's Ray executor calls `ray.init()` from a child process of the engine's actor: with what
    the actor passes it (`pass_ray_to_engine_core`), the child joins this cluster, not a new one,
    and authenticates, though the driver's token file is not on its node; without it, refused."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    actor = ray_local.remote(num_cpus=0)(EngineCoreStandIn).remote()
    try:
        got = ray_local.get(actor.start_engine_core.remote(True))
        assert got["rc"] == 0, got["err"]
        assert got["out"].splitlines()[-1] == ray_local.get_runtime_context().gcs_address
        assert got["path"] != got["driver_path"] and got["mode"] == (0o600, 0o700)
        assert not got["env_has_token"]  # only a path in the environment
        without = ray_local.get(actor.start_engine_core.remote(False))
        assert without["rc"] not in (0, None) and "token" in without["err"], without["err"]
    finally:
        ray_local.kill(actor)
