"""Dry-run planning: where every actor would go on a cluster, and how much GPU memory each process needs.

`dry_run=true` reserves placement on the Ray cluster it joins and prints it; with
`topology.plan_nodes` it plans for a cluster that is not there (a 64-GPU layout on a laptop): each
actor's bundles go first-fit onto the described nodes, honouring custom resources, and a
tensor-parallel engine's bundles stay on one node (STRICT_PACK), as on a real cluster.

The memory estimate per GPU process, from the model's config alone (no weights are read):
- learner rank (FSDP2, fp32 master weights, AdamW): (4 weights + 4 grads + 8 Adam moments) bytes ×
  parameters / ranks, + 4 bytes × parameters / ranks for a frozen reference (KL > 0); with LoRA
  (`learner.lora.rank` > 0) 4 bytes × parameters / ranks of frozen base, 16 bytes × adapter parameters /
  ranks (the adapters train), and no reference (the base, adapters disabled), + activations
  of one micro-batch (`learner.micro_batch_tokens` × hidden × layers × 34 bytes; 2 bytes with
  gradient checkpointing) + its logits (tokens × vocabulary × 2 bytes of bf16 logits kept for
  backward, and 12 bytes per element of one `learner.logits_chunk_tokens` chunk of fp32 log-softmax
  work) — with a large vocabulary and no chunking this term dominates;
- engine worker: its weights (engine dtype, split over tensor parallelism); vLLM takes
  `rollout.gpu_memory_utilization` of the GPU and the rest of that share, less ~1 GiB of activations,
  is KV cache;
- colocated hand-over (`topology.colocate`, the weight sync on a shared GPU; see
  `launch.Actors.handover`): the learner rank's fp32 weight shards (and reference) with AdamW's
  moments already on the host, the engine's weights, and three buckets (`sync.bucket_mb`: the
  gathered tensors, the packed buffer, the engine's receive buffer). Activations, logits and KV cache
  are freed by then, so it stays below the larger of the two processes rather than their sum.
It is an estimate to catch layouts that cannot fit, not a profile.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError, check
from orchestration.config.stages import ROLES  # every actor kind, in placement order

GIB = 1 << 30
ENGINE_OVERHEAD_GIB = 1.0
LOW_KV_CACHE_GIB = 2.0


def role_bundle(cfg: Any, role: str) -> tuple[int, dict[str, float]]:
    """(number of actors, logical Ray resources per actor) of a role."""
    t = cfg.topology
    count, cpus, gpus, extra = {
        "rollout": (cfg.rollout.num_actors, t.rollout_cpus, t.rollout_gpus, t.rollout_resources),
        "learner": (cfg.learner.num_ranks, t.learner_cpus, t.learner_gpus, t.learner_resources),
        "reward": (cfg.reward.num_workers, t.reward_cpus, 0.0, {}),
    }[role]
    return count, {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **dict(extra)}


def required_resources(cfg: Any, roles: tuple[str, ...] = ROLES) -> dict[str, float]:
    """Logical Ray resources the topology asks for, summed over the actors of `roles`."""
    need: dict[str, float] = {}
    for role in roles:
        count, bundle = role_bundle(cfg, role)
        for key, value in bundle.items():
            need[key] = need.get(key, 0.0) + count * value
    if cfg.topology.colocate and {"rollout", "learner"} <= set(roles) and need.get("GPU"):
        need["GPU"] = float(cfg.rollout.num_actors)  # each engine/rank pair holds a whole GPU
    return {k: v for k, v in need.items() if v > 0}


def validate_resources(cfg: Any, available: dict[str, float], roles: tuple[str, ...] = ROLES) -> None:
    """Check the topology against the Ray cluster's logical resources (`ray.cluster_resources()`)."""
    for key, amount in required_resources(cfg, roles).items():
        have = available.get(key, 0.0)
        check(amount <= have + 1e-9,
               f"the topology asks for {amount:g} {key} but the Ray cluster has {have:g} "
               f"(set topology.num_cpus / topology.* per-actor resources, or add nodes)")


@dataclass
class Node:
    name: str
    free: dict[str, float]  # resources left
    actors: list[tuple[str, int, str]] = field(default_factory=list)  # (role, index, resources)

    def summary(self) -> str:
        """`rollout 0-3 (GPU=2, ... each); reward 0 (CPU=1)`: runs of one role with equal resources."""
        runs: list[list] = []
        for role, i, res in self.actors:
            if runs and runs[-1][0] == role and runs[-1][3] == res and runs[-1][2] == i - 1:
                runs[-1][2] = i
            else:
                runs.append([role, i, i, res])
        return "; ".join(f"{role} {a}" + (f"-{b} ({res} each)" if b > a else f" ({res})") for role, a, b, res in runs)


def parse_nodes(specs: list[str]) -> list[Node]:
    """Per entry `COUNTxGPUS[@label][:key=amount,...]`: `6x8@rollout_node` is six 8-GPU nodes with
    the custom resource rollout_node=8 each; `"2x8:cpu=96,learner_node=8"` spells resources out."""
    nodes = []
    for spec in specs:
        m = re.fullmatch(r"(\d+)x(\d+)(?:@(\w+))?(?::(.*))?", spec.strip())
        if not m:
            raise ConfigError(f"topology.plan_nodes entry {spec!r} is not COUNTxGPUS[@label][:resource=amount,...]")
        extra = {m.group(3): float(m.group(2))} if m.group(3) else {}
        for item in filter(None, (m.group(4) or "").split(",")):
            key, _, value = item.partition("=")
            extra["CPU" if key == "cpu" else key] = float(value)
        for _ in range(int(m.group(1))):
            nodes.append(Node(f"node{len(nodes)}", {"CPU": math.inf, "GPU": float(m.group(2)), **extra}))
    return nodes


def actor_bundles(cfg: Any, role: str) -> list[list[dict[str, float]]]:
    """Per actor of a role, the bundles it reserves (TP engines: one one-GPU bundle per worker)."""
    count, bundle = role_bundle(cfg, role)
    if role == "rollout" and cfg.rollout.tensor_parallel_size > 1:
        return [tp_engine_bundles(cfg) for _ in range(count)]
    return [[dict(bundle)] for _ in range(count)]


def tp_engine_bundles(cfg: Any) -> list[dict[str, float]]:
    """One engine's placement group with tensor parallelism TP: TP one-GPU bundles (vLLM's Ray
    executor refuses larger ones), the actor's CPUs and custom resources spread over them."""
    tp, t = cfg.rollout.tensor_parallel_size, cfg.topology
    extra = {k: v / tp for k, v in t.rollout_resources.items()}
    return [{"CPU": t.rollout_cpus / tp, "GPU": 1.0, **extra} for _ in range(tp)]


def place_on(cfg: Any, nodes: list[Node], roles: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(role, index, node) per actor, first fit; an actor's bundles share one node (colocated: an
    engine and its learner rank share one bundle, and a whole GPU)."""
    rows = []
    pairs = cfg.topology.colocate and {"rollout", "learner"} <= set(roles)
    for role in roles:
        if pairs and role == "learner":
            continue
        paired = pairs and role == "rollout"
        for i, bundles in enumerate(actor_bundles(cfg, role)):
            if paired:
                bundles = bundles + actor_bundles(cfg, "learner")[i]
            need: dict[str, float] = {}
            for b in bundles:
                for k, v in b.items():
                    need[k] = need.get(k, 0.0) + v
            if paired and need.get("GPU"):
                need["GPU"] = 1.0
            node = next((n for n in nodes if all(n.free.get(k, 0.0) >= v - 1e-9 for k, v in need.items())), None)
            if node is None:
                raise ConfigError(f"{role} {i} ({_fmt(need)}) fits on none of the planned nodes "
                                  f"(topology.plan_nodes={list(cfg.topology.plan_nodes)})")
            for k, v in need.items():
                node.free[k] -= v
            node.actors.append(("rollout+learner" if paired else role, i, _fmt(need)))
            rows += [(role, i, node.name)] + ([("learner", i, node.name)] if paired else [])
    return rows


def model_shape(path: str, lora: Any = None) -> dict[str, int] | None:
    """Parameters, hidden size, layers and vocabulary from the model's config (None if unreadable:
    a hub id without network, say), and with `lora` (`learner.lora`, rank > 0) the adapters'
    parameters. Built on the meta device: nothing is allocated."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from common.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(path) if path.startswith("builtin:") else path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    shape = {"params": sum(p.numel() for p in model.parameters()), "hidden": config.hidden_size,
             "layers": config.num_hidden_layers, "vocab": config.vocab_size}
    if lora is not None and lora.rank > 0:
        shape["lora_params"] = lora_params(model, lora.rank, list(lora.target_modules))
    return shape


def lora_params(model: Any, rank: int, targets: list[str]) -> int:
    """Adapter parameters peft would add: r × (in + out) per targeted linear layer (`all-linear`: every
    linear layer but the output head; else those whose name ends with a target)."""
    import torch

    head = model.get_output_embeddings()
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if targets == ["all-linear"] or any(name == t or name.endswith(f".{t}") for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def memory_estimate(cfg: Any, shape: dict[str, int]) -> list[tuple[str, dict[str, float], str]]:
    """(process, {part: GiB}, warning or "") for a learner rank and an engine worker on GPUs."""
    t, r, l = cfg.topology, cfg.rollout, cfg.learner
    p, gpu = shape["params"], t.gpu_memory_gb * 1e9 / GIB
    out = []
    if t.learner_gpus > 0:
        tokens = l.micro_batch_tokens
        act = tokens * shape["hidden"] * shape["layers"] * (2 if cfg.model.gradient_checkpointing else 34)
        if l.lora.rank > 0:  # frozen fp32 base, trained adapters; the reference is the base itself
            parts = {"base weights": 4 * p / l.num_ranks / GIB,
                     "adapters+grads+adam": 16 * shape.get("lora_params", 0) / l.num_ranks / GIB, "reference": 0.0}
        else:
            parts = {"weights+grads+adam": 16 * p / l.num_ranks / GIB,
                     "reference": (4 * p / l.num_ranks if cfg.algo.kl_coef > 0 else 0) / GIB}
        parts.update(activations=act / GIB, logits=logits_bytes(cfg, tokens, shape["vocab"]) / GIB)
        total = sum(parts.values())
        warn = f"needs ~{total:.0f} GiB of a {gpu:.0f} GiB GPU: add ranks or lower learner.micro_batch_tokens" \
            if total > 0.9 * gpu else ""
        out.append(("learner rank", parts, warn))
    if t.rollout_gpus > 0:
        wire = 4 if (cfg.model.dtype == "float32") else 2
        weights = wire * p / r.tensor_parallel_size / GIB
        kv = r.gpu_memory_utilization * gpu - weights - ENGINE_OVERHEAD_GIB
        warn = "" if kv >= LOW_KV_CACHE_GIB else (
            f"{kv:.1f} GiB left for KV cache: raise rollout.gpu_memory_utilization or tensor_parallel_size")
        out.append(("engine worker", {"weights": weights, "kv_cache": max(kv, 0.0)}, warn))
    if t.colocate and t.learner_gpus > 0 and t.rollout_gpus > 0:
        reference = 4 * p if cfg.algo.kl_coef > 0 and l.lora.rank == 0 else 0
        parts = {"learner weights": (4 * p + reference + 4 * shape.get("lora_params", 0)) / l.num_ranks / GIB,
                 "engine weights": weights, "buckets": 3 * (cfg.sync.bucket_mb << 20) / GIB}
        total = sum(parts.values())
        warn = f"the colocated weight sync needs ~{total:.0f} GiB of a {gpu:.0f} GiB GPU: lower sync.bucket_mb " \
            "or add ranks" if total > 0.9 * gpu else ""
        out.append(("hand-over", parts, warn))
    return out


def logits_bytes(cfg: Any, tokens: int, vocab: int) -> float:
    """The model's bf16 logits of a micro-batch, kept for backward, plus fp32 log-softmax work for
    one chunk of `learner.logits_chunk_tokens` positions (or all of them: 0)."""
    chunk = cfg.learner.logits_chunk_tokens or tokens
    return tokens * vocab * 2 + min(chunk, tokens) * vocab * 12


def describe_plan(cfg: Any, roles: tuple[str, ...]) -> str:
    """The dry run's report for `topology.plan_nodes`: per node its actors, then the memory estimate."""
    nodes = parse_nodes(list(cfg.topology.plan_nodes))
    place_on(cfg, nodes, roles)
    lines = [f"{n.name}: {n.summary()}" for n in nodes if n.actors]
    idle = [n.name for n in nodes if not n.actors]
    if idle:
        lines.append(f"idle: {', '.join(idle)}")
    return "\n".join(lines + [""] + memory_lines(cfg))


def memory_lines(cfg: Any) -> list[str]:
    """The GPU memory estimate as text (nothing for a CPU-only topology)."""
    if cfg.topology.rollout_gpus == 0 and cfg.topology.learner_gpus == 0:
        return []
    shape = model_shape(cfg.model.path, cfg.learner.lora)
    if shape is None:
        return [f"GPU memory estimate: no config.json readable for {cfg.model.path}"]
    lines = [f"GPU memory per process, estimated for {shape['params'] / 1e9:.2f}B parameters on "
             f"{cfg.topology.gpu_memory_gb:g} GB GPUs:"]
    for name, parts, warn in memory_estimate(cfg, shape):
        detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if v)
        lines.append(f"  {name:<14} {sum(parts.values()):6.1f} GiB  ({detail})")
        if warn:
            lines.append(f"  WARNING {name}: {warn}")
    return lines


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in res.items() if v)
