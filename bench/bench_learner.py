"""Learner throughput on CPU, plain rows vs shared-prompt rows, in one run: one FSDP2 rank (gloo),
GRPO steps on a synthetic batch shaped like the demo's (8 groups × 8 completions sharing a
~45-token prompt, completions ~18 tokens, varying). Prints one JSON line.

    python bench/bench_learner.py --model builtin:smollm2-135m --threads 2

- step_s, cpu_s: median wall and process-CPU seconds of a step (CPU time is the steadier
  measure on a shared machine; steps_s lists every timed step's wall time).
- tokens_per_s: useful tokens (Σ prompt + completion of every sequence, i.e. the unshared
  batch's tokens) / step time — the same numerator for both modes, so the ratio is the speed-up.
- padding_frac: padding token slots / all token slots of the step's forwards (learner metric).
- gflops_per_s: FLOPs the forwards and backwards actually ran, padding included, per second:
      6·N·S + 6·d·V·K + 12·n_layers·d·Σ_rows L²
  N non-embedding parameters, S token slots processed (Σ over micro-batches of rows × L),
  d hidden size, V vocabulary, K logits positions computed (rows × (L − start)), the last term
  the attention scores and weighted sums over the full L × L of each row (masked entries cost
  the same), each ×3 for forward + backward.
- peak_frac: that rate / the best fp32 rate of a 2048×2048 torch matmul (2·n³ FLOPs) timed here
  with the same thread count (before and after the steps).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from unittest import mock

import torch

from learner.batch import TrainBatch, row_lengths
from learner.objectives import GRPOObjective
from learner.spec import LearnerSpec
from learner.worker import LearnerWorker, free_port
from common.models import resolve_model_path


def demo_batch(groups: int, size: int, prompt: int, completion: int, seed: int = 0) -> TrainBatch:
    """groups × size sequences, group-contiguous; prompt lengths ±2, completion lengths ±8."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(groups):
        p = [rng.randrange(1000) for _ in range(rng.randint(prompt - 2, prompt + 2))]
        for _ in range(size):
            prompts.append(p)
            n = rng.randint(max(1, completion - 8), completion + 8)
            completions.append([rng.randrange(1000) for _ in range(n)])
    B = len(prompts)
    return TrainBatch(prompts, completions, [[-1.0] * len(c) for c in completions],
                      [rng.choice([-1.0, 1.0]) for _ in range(B)], [1.0] * B)


def peak_flops(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """Best fp32 FLOP/s of an n × n matmul on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def step_flops(worker: LearnerWorker, batch: TrainBatch) -> tuple[float, int]:
    """(FLOPs of one train_step's forwards + backwards per the module docstring, token slots S)."""
    cfg = worker.model.config
    d, V, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    n = sum(p.numel() for name, p in worker.model.named_parameters() if "embed" not in name and "lm_head" not in name)
    flops, slots = 0.0, 0
    for rows in worker._micro_plan(batch):
        lengths = row_lengths(batch, rows)  # plain: one sequence per row
        L, start = max(lengths), min(len(batch.prompt_ids[r[0]]) for r in rows) - 1
        S, K = len(rows) * L, len(rows) * (L - start)
        flops += 6 * n * S + 6 * d * V * K + 12 * layers * d * len(rows) * L * L
        slots += S
    return flops, slots


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny-qwen2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=45)
    ap.add_argument("--completion", type=int, default=18)
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step each)")
    args = ap.parse_args()
    worker = LearnerWorker(0, 1)
    with mock.patch("ray.get_gpu_ids", return_value=[]):  # no Ray: this process is the rank, on the CPU
        worker.setup(f"127.0.0.1:{free_port()}", LearnerSpec(
            model_path=resolve_model_path(args.model), objective=GRPOObjective(), lr=1e-6,
            micro_batch_tokens=args.micro_batch_tokens, cpu_threads=args.threads, share_prompts=True))
    batch = demo_batch(args.groups, args.group_size, args.prompt, args.completion)
    useful = sum(batch.lengths())
    modes = {"plain": False, "shared": True} if worker.share_prompts else {"plain": False}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    metrics: dict[str, dict] = {}
    peak = peak_flops(args.threads)
    for step in range(args.steps + 1):
        for mode, share in modes.items():  # interleaved: both modes see the same machine state
            worker.share_prompts = share
            start, cpu = time.perf_counter(), time.process_time()
            metrics[mode] = worker.train_step(batch)
            if step:
                times[mode].append((time.perf_counter() - start, time.process_time() - cpu))
    peak = max(peak, peak_flops(args.threads))  # before and after: the better of two, on a shared machine
    out = {"model": args.model, "threads": torch.get_num_threads(), "sequences": len(batch), "useful_tokens": useful,
           "peak_gflops_per_s": round(peak / 1e9, 2)}
    for mode, share in modes.items():
        worker.share_prompts = share
        flops, slots = step_flops(worker, batch)
        seconds, cpu = (statistics.median(x) for x in zip(*times[mode]))
        out[mode] = {"step_s": round(seconds, 2), "cpu_s": round(cpu, 2),
                     "steps_s": [round(t, 2) for t, _ in times[mode]],
                     "tokens_per_s": round(useful / seconds, 1), "token_slots": slots,
                     "padding_frac": round(metrics[mode]["padding_frac"], 4),
                     "gflops_per_s": round(flops / seconds / 1e9, 2), "peak_frac": round(flops / seconds / peak, 4)}
    if "shared" in out:
        out["speedup"] = round(out["plain"]["step_s"] / out["shared"]["step_s"], 2)
        out["speedup_cpu"] = round(out["plain"]["cpu_s"] / out["shared"]["cpu_s"], 2)
    print(json.dumps(out))
    worker.shutdown()


if __name__ == "__main__":
    main()
