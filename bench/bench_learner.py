"""Learner throughput on CPU: one FSDP2 rank (gloo), a GRPO step over a synthetic batch shaped
like the demo's (64 sequences of ~45 prompt + ~18 completion tokens). Prints tokens/s.

    RAYGRPO_CACHE=... python bench/bench_learner.py --model builtin:smollm2-135m --threads 2
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from learner.batch import TrainBatch
from learner.objectives import GRPOObjective
from learner.worker import LearnerWorker, free_port
from orchestration.models import resolve_model_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:tiny-qwen2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=45)
    ap.add_argument("--completion", type=int, default=18)
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    worker = LearnerWorker(0, 1)
    worker.setup(f"127.0.0.1:{free_port()}", model_path=resolve_model_path(args.model), objective=GRPOObjective(),
                 lr=1e-6, micro_batch_tokens=args.micro_batch_tokens, cpu_threads=args.threads)
    rng = random.Random(0)
    B = args.sequences
    batch = TrainBatch([[rng.randrange(1000) for _ in range(args.prompt)] for _ in range(B)],
                       [[rng.randrange(1000) for _ in range(args.completion)] for _ in range(B)],
                       [[-1.0] * args.completion for _ in range(B)], [rng.choice([-1.0, 1.0]) for _ in range(B)],
                       [1.0] * B)
    tokens = B * (args.prompt + args.completion)
    for step in range(args.steps):
        start = time.perf_counter()
        worker.train_step(batch)
        seconds = time.perf_counter() - start
        print(f"step {step}: {seconds:.2f} s, {tokens / seconds:.0f} tokens/s "
              f"({tokens} tokens, {torch.get_num_threads()} threads)")
    worker.shutdown()


if __name__ == "__main__":
    main()
