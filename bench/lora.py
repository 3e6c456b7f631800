"""LoRA vs full fine-tuning on one machine, ratios measured in one run: weight sync time (full,
LoRA merged, LoRA adapter), learner step time and peak memory, and engine generation speed with
vLLM's LoRA on and off (what decides the sync path per backend; see README, LoRA).

Each learner is one FSDP2 rank (a Ray actor). The full and merged syncs go into a plain vLLM
engine, the adapter sync into one started with LoRA enabled; a step trains on a fixed batch of
random tokens. Peak memory is the learner process's max RSS after its steps (CPU). Medians of
`--reps` after a warm-up. Prints one JSON line.

    .venv/bin/python bench/lora.py                          # SmolLM2-135M, rank 16
    .venv/bin/python bench/lora.py --model builtin:tiny-qwen2 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
import torch  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb(group) -> float:
    def rss(_worker):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    return ray.get(group.workers[0].__ray_call__.remote(rss))


def fixed_batch(n: int, length: int, vocab: int):
    from learner.batch import TrainBatch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (16,), generator=g).tolist() for _ in range(n)]
    completions = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]
    return TrainBatch(prompts, completions, [[-4.0] * length] * n, [(-1.0) ** i for i in range(n)], [1.0] * n)


def generation_tps(engine, prompts: int, tokens: int) -> float:
    from actors.types import Prompt, SamplingSpec

    spec = SamplingSpec(n=4, temperature=1.0, max_tokens=tokens, seed=0)
    batch = [Prompt(str(i), f"What is {i} + {i + 3}?") for i in range(prompts)]
    seconds = timed(lambda: ray.get(engine.generate.remote(batch, spec)), 1)
    return 4 * prompts * tokens / seconds  # ignore_eos is not set: an upper bound on the token count


def run_learner(args, model, lora, engine, label):
    """One learner against `engine`: sync time, step time, peak RSS; the learner is shut down after."""
    from learner.group import LearnerGroup
    from learner.objectives import GRPOObjective
    from learner.spec import LearnerSpec
    from orchestration.cluster.pools import RolloutPool
    from orchestration.cluster.weight_sync import WeightSync

    spec = LearnerSpec(model_path=model, objective=GRPOObjective(), lr=1e-5, mixed_precision=False,
                       cpu_threads=args.learner_threads, micro_batch_tokens=512, lora=lora)
    group = LearnerGroup(1, [{"num_cpus": 2}], spec)
    try:
        sync = WeightSync(group, RolloutPool([engine], timeout_s=600.0), backend="gloo", dtype="float32",
                          bucket_mb=64, timeout_s=600)
        sync.connect()
        version = [0]

        def push():
            version[0] += 1
            sync.push(version[0])

        batch = fixed_batch(args.batch, 48, args.vocab)
        row = {"run": label, "sync_bytes": 4 * sum(torch.Size(s).numel() for _, s in sync.manifest),
               "sync_s": round(timed(push, args.reps), 3),
               "step_s": round(timed(lambda: group.train_step(batch), args.reps), 3),
               "learner_peak_rss_mb": round(peak_rss_mb(group))}
    finally:
        group.shutdown()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--learner-threads", type=int, default=2)
    ap.add_argument("--gen-prompts", type=int, default=4, help="prompts (x4 samples) of the generation probe")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="sequences (16 prompt + 48 completion tokens) of a step")
    args = ap.parse_args()

    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec
    from common.models import resolve_model_path
    from learner.spec import LoRASpec
    from orchestration.cluster.placement import start_local_ray, worker_env
    from orchestration.config.lora import engine_lora_rank

    os.environ.pop("RAY_ADDRESS", None)
    model = resolve_model_path(args.model)
    from transformers import AutoConfig

    args.vocab = min(AutoConfig.from_pretrained(model).vocab_size, 5000)
    start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    rows, gen = [], {}
    try:
        for lora_engine in (False, True):
            spec = EngineSpec(model, dtype="float32", max_model_len=512, kv_cache_gb=1,
                              lora_rank=engine_lora_rank(args.rank) if lora_engine else 0)
            engine = ray.remote(RolloutActor).options(num_cpus=2).remote(spec)
            ray.get(engine.ready.remote())
            try:
                if not lora_engine:
                    gen["engine_tokens_per_s"] = round(generation_tps(engine, args.gen_prompts, args.gen_tokens))
                    rows.append(run_learner(args, model, LoRASpec(), engine, "full"))
                    rows.append(run_learner(args, model, LoRASpec(rank=args.rank, sync="merged"), engine, "lora merged"))
                else:
                    rows.append(run_learner(args, model, LoRASpec(rank=args.rank, sync="adapter"), engine,
                                            "lora adapter"))
                    gen["lora_engine_tokens_per_s"] = round(generation_tps(engine, args.gen_prompts, args.gen_tokens))
            finally:
                ray.get(engine.shutdown.remote())
                ray.kill(engine)
        full = rows[0]
        for row in rows:
            row["sync_vs_full"] = round(row["sync_s"] / full["sync_s"], 3)
            row["step_vs_full"] = round(row["step_s"] / full["step_s"], 3)
        print(json.dumps({"bench": "lora", "model": args.model, "rank": args.rank, "reps": args.reps,
                          "results": rows, **gen}))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
