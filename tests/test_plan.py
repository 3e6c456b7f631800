"""Dry-run planning (orchestration/cluster/plan.py): placement on described nodes, the memory estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestration.config import ConfigError
from orchestration.cluster.plan import GIB, memory_estimate, parse_nodes, place_on
from tests.test_config import make_cfg

QWEN7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
          "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
          "vocab_size": 152064, "tie_word_embeddings": False}
LAYOUT64 = ["topology=multinode", "rollout=gpu", "learner=gpu", "rollout.num_actors=24", "learner.num_ranks=16",
            "rollout.prompts_per_step=96", "topology.plan_nodes=[6x8@rollout_node,2x8@learner_node]"]


def test_parse_nodes():
    a, b, c = parse_nodes(["2x8@rollout_node", "1x4:cpu=32,learner_node=4"])
    assert (a.name, b.name, c.name) == ("node0", "node1", "node2")
    assert a.free["GPU"] == 8 and a.free["rollout_node"] == 8 and a.free["CPU"] == float("inf")
    assert c.free == {"CPU": 32.0, "GPU": 4.0, "learner_node": 4.0}
    with pytest.raises(ConfigError, match="is not COUNTxGPUS"):
        parse_nodes(["eight nodes"])


def test_64_gpu_layout_places_engines_and_learner_on_their_nodes():
    cfg = make_cfg(*LAYOUT64)
    nodes = parse_nodes(list(cfg.topology.plan_nodes))
    rows = place_on(cfg, nodes, ("rollout", "reward", "learner"))
    where = {(role, i): node for role, i, node in rows}
    assert [where["rollout", i] for i in range(24)] == [f"node{i // 4}" for i in range(24)]  # 4 TP=2 engines a node
    assert [where["learner", i] for i in range(16)] == ["node6"] * 8 + ["node7"] * 8
    assert all(n.free["GPU"] == 0 for n in nodes)  # 48 + 16 GPUs, all used
    assert nodes[0].summary() == "rollout 0-3 (CPU=8, GPU=2, rollout_node=1 each); reward 0 (CPU=1)"


def test_what_does_not_fit_is_named():
    cfg = make_cfg(*LAYOUT64[:-1], "topology.plan_nodes=[5x8@rollout_node,2x8@learner_node]")
    with pytest.raises(ConfigError, match=r"rollout 20 \(CPU=8, GPU=2, rollout_node=1\) fits on none"):
        place_on(cfg, parse_nodes(list(cfg.topology.plan_nodes)), ("rollout", "reward", "learner"))
    # a TP engine's workers share one node: two 1-GPU nodes cannot hold a TP=2 engine
    cfg = make_cfg(*LAYOUT64[:-1], "rollout.num_actors=1", "topology.plan_nodes=[2x1@rollout_node,2x8@learner_node]")
    with pytest.raises(ConfigError, match="rollout 0"):
        place_on(cfg, parse_nodes(list(cfg.topology.plan_nodes)), ("rollout",))


def test_memory_estimate_by_hand():
    cfg = make_cfg(*LAYOUT64, "model.gradient_checkpointing=true", "algo.kl_coef=0")
    shape = {"params": 8 * 10**9, "hidden": 4096, "layers": 32, "vocab": 128_000}
    (learner, lparts, lwarn), (engine, eparts, ewarn) = memory_estimate(cfg, shape)
    assert lparts["weights+grads+adam"] == pytest.approx(16 * 8e9 / 16 / GIB)
    assert lparts["reference"] == 0
    assert lparts["activations"] == pytest.approx(16384 * 4096 * 32 * 2 / GIB)
    assert lparts["logits"] == pytest.approx((16384 * 128_000 * 2 + 4096 * 128_000 * 12) / GIB)
    assert eparts["weights"] == pytest.approx(2 * 8e9 / 2 / GIB)  # bf16, split over TP=2
    assert eparts["kv_cache"] == pytest.approx(0.85 * 80e9 / GIB - eparts["weights"] - 1.0)
    assert not lwarn and not ewarn
    small = make_cfg(*LAYOUT64, "topology.gpu_memory_gb=20", "rollout.tensor_parallel_size=1", "topology.rollout_gpus=1")
    (_, _, lwarn), (_, _, ewarn) = memory_estimate(small, shape)
    assert "of a 19 GiB GPU" in lwarn and "left for KV cache" in ewarn


def test_cli_plans_a_cluster_that_is_not_there(tmp_path):
    model = tmp_path / "qwen7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN7B))  # a config is all a plan needs
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYGRPO_CACHE"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, "-m", "orchestration", *LAYOUT64, f"model.path={model}", "dry_run=true"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "node5: rollout 20-23 (CPU=8, GPU=2, rollout_node=1 each)" in res.stdout
    assert "node7: learner 8-15 (CPU=4, GPU=1, learner_node=1 each)" in res.stdout
    assert "estimated for 7.62B parameters" in res.stdout and "WARNING learner rank" in res.stdout
    assert "Started a local Ray" not in res.stdout + res.stderr  # planned without a cluster


def test_colocated_pairs_share_a_node_and_a_whole_gpu():
    cfg = make_cfg("topology=single_gpu_colocated", "rollout=gpu", "learner=gpu", "rollout.num_actors=3",
                   "learner.num_ranks=3", "rollout.prompts_per_step=3", "rollout.group_size=4",
                   "topology.plan_nodes=[1x2,1x1]")
    nodes = parse_nodes(list(cfg.topology.plan_nodes))
    rows = place_on(cfg, nodes, ("rollout", "reward", "learner"))
    where = {(role, i): node for role, i, node in rows}
    assert [where["rollout", i] for i in range(3)] == [where["learner", i] for i in range(3)] == ["node0", "node0", "node1"]
    assert nodes[0].summary() == "rollout+learner 0-1 (CPU=4, GPU=1 each); reward 0 (CPU=1)"


def test_colocated_hand_over_estimate_is_below_the_sum_of_both_processes():
    cfg = make_cfg("topology=single_gpu_colocated", "rollout=gpu", "learner=gpu", "algo.kl_coef=0", "sync.bucket_mb=512")
    shape = {"params": 7 * 10**9, "hidden": 3584, "layers": 28, "vocab": 152_064}
    rows = {name: parts for name, parts, _ in memory_estimate(cfg, shape)}
    hand = rows["hand-over"]
    assert hand["learner weights"] == pytest.approx(4 * 7e9 / GIB)  # fp32 master weights; AdamW on the host
    assert hand["engine weights"] == pytest.approx(rows["engine worker"]["weights"])
    assert hand["buckets"] == pytest.approx(3 * 512 / 1024)
    peak = sum(hand.values())
    assert peak < max(sum(rows["learner rank"].values()), sum(rows["engine worker"].values()))
    assert "hand-over" not in {name for name, _, _ in memory_estimate(make_cfg(*LAYOUT64), shape)}  # not colocated
