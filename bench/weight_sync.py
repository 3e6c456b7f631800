"""Weight sync through the real path vs a bare broadcast of the same bytes, per bucket size.

The real path: a LearnerGroup (FSDP2 ranks as Ray actors) pushes SmolLM2-135M (fp32, 538 MB)
through `WeightSync` into R `RolloutActor` vLLM engines — gathers, packing, checksums on both
sides, vLLM's weight loading, the prefix-cache reset. The bare path: Ray actors in the same run
broadcast buffers of the same bucket plan over the same backend and do nothing else. Each is
warmed up once, then timed `--reps` times from the driver (median). Prints one JSON line.

    .venv/bin/python bench/weight_sync.py                      # 1 engine, buckets 16/64/256 MB
    .venv/bin/python bench/weight_sync.py --engines 2 --bucket-mb 64 --reps 5
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

from learner.group_store import new_secret  # noqa: E402
from learner.weights import TensorSpec, make_transport, plan_buckets  # noqa: E402


class Peer:
    """One end of the bare broadcast: preallocated buffers, nothing but send/recv."""

    def address(self) -> str:
        from learner.worker import free_port

        return f"{ray.util.get_node_ip_address()}:{free_port()}"

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str, generation: int,
             secret: str) -> int:
        if getattr(self, "transport", None) is not None:
            self.transport.close()
        self.transport = make_transport(backend, host, port, rank, world_size, generation, 300.0, secret=secret)
        self.rank = rank
        return rank

    def prepare(self, sizes: list[int]) -> None:
        self.buffers = [torch.ones(n) for n in sizes]

    def run(self) -> float:
        start = time.perf_counter()
        for buf in self.buffers:
            (self.transport.send if self.rank == 0 else self.transport.recv)(buf)
        return time.perf_counter() - start


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=1, help="learner ranks (FSDP2)")
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--learner-threads", type=int, default=2)
    args = ap.parse_args()

    from actors.rollout import RolloutActor  # noqa: F401  (importable before Ray starts)
    from actors.spec import EngineSpec
    from learner.group import LearnerGroup
    from learner.objectives import GRPOObjective
    from learner.spec import LearnerSpec
    from orchestration.cluster.placement import start_local_ray, worker_env
    from common.models import resolve_model_path
    from orchestration.cluster.pools import RolloutPool
    from orchestration.cluster.weight_sync import WeightSync

    os.environ.pop("RAY_ADDRESS", None)
    model = resolve_model_path(args.model)  # build the built-in once, before the actors race for it
    start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    try:
        rollout = RolloutPool.start([{"num_cpus": 2}] * args.engines,
                                    EngineSpec(model, gpu=False, dtype="float32", max_model_len=512, kv_cache_gb=1),
                                    600.0)
        learner = LearnerGroup(args.ranks, [{"num_cpus": 2}] * args.ranks,
                               LearnerSpec(model_path=model, objective=GRPOObjective(), lr=1e-5, mixed_precision=False,
                                           cpu_threads=args.learner_threads))
        sync = WeightSync(learner, rollout, backend=args.backend, dtype="float32", bucket_mb=64, timeout_s=600)
        specs = [TensorSpec(n, tuple(s)) for n, s in sync.manifest]
        peers = [ray.remote(Peer).options(num_cpus=0.1).remote() for _ in range(1 + args.engines)]
        version, generation, rows = 0, 0, []
        for mb in args.bucket_mb:
            sync.bucket_bytes = mb << 20
            sync.connect()

            def push():
                nonlocal version
                version += 1
                sync.push(version)

            sync_s = timed(push, args.reps)
            sizes = [sum(s.numel for s in b) for b in plan_buckets(specs, mb << 20, 4)]
            host, port = ray.get(peers[0].address.remote()).rsplit(":", 1)
            secret = new_secret()
            ray.get([p.join.remote(host, int(port), r, len(peers), args.backend, generation, secret)
                     for r, p in enumerate(peers)])
            generation += 1
            ray.get([p.prepare.remote(sizes) for p in peers])
            bare_s = timed(lambda: ray.get([p.run.remote() for p in peers]), args.reps)
            rows.append({"bucket_mb": mb, "buckets": len(sizes), "sync_s": round(sync_s, 3), "bare_s": round(bare_s, 3),
                         "bare_over_sync": round(bare_s / sync_s, 3)})
        total = sum(s.numel for s in specs) * 4
        print(json.dumps({"bench": "weight_sync", "model": args.model, "bytes": total, "engines": args.engines,
                          "learner_ranks": args.ranks, "backend": args.backend, "reps": args.reps, "results": rows}))
        learner.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
