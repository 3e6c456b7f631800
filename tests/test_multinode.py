"""End to end: `raygrpo experiment=smoke` (tiny model, 2 rollout actors, 1 reward worker, 2 learner
ranks, 3 steps) on a real two-node Ray cluster on this machine, on loopback only, submitted with
`ray job submit`, engines pinned to one node and the learner to the other — disaggregated, so
with `rollout.max_staleness=1`: the engines generate step s+1 while the learner trains step s. (The local path, where
the driver starts its own Ray, runs end to end in test_e2e_data.py.)

Both raylets run here (`ray start --block`, each in a process group the test owns and kills
whatever happens; never `ray stop`, which would end every Ray on the machine). Their addresses are
127.0.0.2 and 127.0.0.3: Ray maps 127.0.0.1 to the machine's outward address, any other loopback
address it keeps, so nothing is sent beyond loopback. Ray 2.60's token authentication is on, with
a token made for the test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
HEAD, OTHER = "127.0.0.2", "127.0.0.3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `ray start --block` in a process group of its own."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text():
                return
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(1)
        raise TimeoutError(self.log.read_text()[-3000:])

    def kill(self) -> None:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        try:  # a raylet's children left behind in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def job(env: dict[str, str], dashboard: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args[:1], "--address", dashboard, *args[1:]], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_job_on_a_two_node_cluster(tmp_path, cache_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAYGRPO_CACHE=cache_dir)
    temp = Path(tempfile.mkdtemp(prefix="rgmn-", dir="/tmp"))  # short: Ray's socket paths must fit
    gcs, dash = free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dash}"
    nodes: list[Node] = []
    try:
        nodes.append(Node(["--head", f"--node-ip-address={HEAD}", f"--port={gcs}", "--num-cpus=3",
                           '--resources={"node_a": 4}', f"--temp-dir={temp}", "--include-dashboard=true",
                           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                           f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=300000000"],
                          env, tmp_path / "head.log"))
        nodes[0].wait_started()
        nodes.append(Node([f"--address={HEAD}:{gcs}", f"--node-ip-address={OTHER}", "--num-cpus=3",
                           '--resources={"node_b": 4}', f"--dashboard-agent-listen-port={free_port()}",
                           "--object-store-memory=300000000"], env, tmp_path / "other.log"))
        nodes[1].wait_started()

        out = tmp_path / "run"
        entry = (f"cd {ROOT} && {sys.executable} -m orchestration experiment=smoke output_dir={out} "
                 "logger.progress=false +topology.rollout_resources.node_a=1 +topology.learner_resources.node_b=1 "
                 "rollout.max_staleness=1")
        deadline = time.monotonic() + 120
        while True:  # the agents that take jobs come up a little after the raylets
            sub = job(env, dashboard, "submit", "--no-wait", "--submission-id", "smoke", "--", "bash", "-c", entry)
            if sub.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        status = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = job(env, dashboard, "status", "smoke").stdout.lower()
            if any(s in status for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(5)
        logs = job(env, dashboard, "logs", "smoke").stdout
        assert "succeeded" in status, status + logs[-4000:]

        placement = json.loads((out / "placement.json").read_text())
        assert [a["node"] for a in placement["rollout"]] == [HEAD, HEAD]
        assert [a["node"] for a in placement["learner"]] == [OTHER, OTHER]
        assert "rollout      0  127.0.0.2" in logs and "learner      1  127.0.0.3" in logs  # printed too
        # the run directory is complete on the driver's side, the policy fetched from the learner's node
        for name in ("metrics.jsonl", "sync.json", "curves.png", "report.md", "config.json", "policy/config.json",
                     "policy/model.safetensors", "policy/tokenizer.json"):
            assert (out / name).is_file(), name
        check_smoke_run(out, Path(cache_dir))
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)
    alive = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
    assert not alive, f"cluster processes left behind: {alive}"


REQUIRED = [
    "reward/mean", "reward/std", "reward/accuracy", "reward/failed", "reward/zero_variance_groups",
    "rollout/response_length_mean", "rollout/response_length_max", "rollout/truncated",
    "learner/clip_frac_low", "learner/clip_frac_high", "learner/approx_kl", "learner/kl_ref",
    "learner/entropy", "learner/grad_norm", "learner/lr", "learner/logprob_mismatch",
    "perf/tokens_per_s", "time/generate", "time/reward", "time/learner", "time/sync", "time/other",
    "rollout/staleness_mean", "rollout/staleness_max", "learner/is_weight_mean", "learner/is_weight_max",
    "learner/is_clipped_frac", "learner/padding_frac",
]


def check_smoke_run(out: Path, cache: Path) -> None:
    """Metrics, W&B, report, and the engines' last checksums equal to the saved (trained) policy's."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.weights import TensorSpec, checksum, checksums_match, pack, plan_buckets

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # 3 training steps, then the final evaluation
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[3] and "reward/mean" not in rows[3]
    for row in rows[:3]:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
    # max_staleness=1: step 0 from the initial weights; steps 1 and 2 generated while the learner
    # trained the step before, with the weights one update behind (importance-weighted)
    assert [r["rollout/staleness_max"] for r in rows[:3]] == [0, 1, 1]
    assert [r["rollout/policy_version"] for r in rows[:3]] == [0, 0, 1]
    assert rows[0]["learner/logprob_mismatch"] < 1e-3  # engines sample from the learner's weights
    assert rows[0]["learner/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert all(0.5 < r["learner/is_weight_mean"] < 2 for r in rows[1:3])
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run"
    assert (out / "curves.png").stat().st_size > 10_000 and "| eval/accuracy |" in (out / "report.md").read_text()

    sync = json.loads((out / "sync.json").read_text())
    assert sync["version"] == 3
    model = AutoModelForCausalLM.from_pretrained(out / "policy", dtype=torch.float32)
    params = dict(model.named_parameters())
    specs = [TensorSpec(n, tuple(p.shape)) for n, p in params.items()]
    sums = [checksum(pack([params[s.name].detach() for s in b], sum(s.numel for s in b), torch.float32, "cpu"))
            for b in plan_buckets(specs, sync["bucket_bytes"], 4)]
    assert checksums_match(sums, sync["engine_checksums"])
    initial = AutoModelForCausalLM.from_pretrained(cache / "models" / "tiny-qwen2", dtype=torch.float32)
    assert any(not torch.equal(p, params[n]) for n, p in initial.named_parameters())  # it trained
