"""Weight-broadcast throughput over the gloo transport (the CPU path): one sender, N receivers
in separate processes, a model-sized set of buckets. Prints MB/s; asserts nothing.
`--blocking-wait`: every member waits in gloo's blocking `Work.wait()` instead of the transport's
polled CPU-side wait with its deadline and abort check (what that costs).

    python bench/bench_transport.py --mb 256 --receivers 2 --bucket-mb 64 [--blocking-wait]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.multiprocessing as mp

from learner.group_store import new_secret
from learner.weights import BroadcastTransport, checksum
from learner.worker import free_port


def blocking_wait(self, work) -> None:
    work.wait()


def receive(rank: int, port: int, world: int, sizes: list[int], secret: str, blocking: bool) -> None:
    if blocking:
        BroadcastTransport._wait = blocking_wait
    t = BroadcastTransport("127.0.0.1", port, rank, world, "gloo", 0, 120, secret=secret)
    for n in sizes:
        buf = torch.empty(n)
        t.recv(buf)
        checksum(buf)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="total fp32 megabytes to send")
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--receivers", type=int, default=2)
    ap.add_argument("--blocking-wait", action="store_true")
    args = ap.parse_args()
    if args.blocking_wait:
        BroadcastTransport._wait = blocking_wait
    per = args.bucket_mb * (1 << 20) // 4
    sizes = [per] * max(1, args.mb // args.bucket_mb)
    port, world = free_port(), args.receivers + 1
    ctx = mp.get_context("spawn")
    secret = new_secret()
    procs = [ctx.Process(target=receive, args=(r, port, world, sizes, secret, args.blocking_wait)) for r in range(1, world)]
    for p in procs:
        p.start()
    sender = BroadcastTransport("127.0.0.1", port, 0, world, "gloo", 0, 120, secret=secret)
    buffers = [torch.randn(n) for n in sizes]
    start = time.perf_counter()
    for buf in buffers:
        sender.send(buf)
        checksum(buf)
    for p in procs:
        p.join()
    seconds = time.perf_counter() - start
    total = sum(sizes) * 4 / 2**20
    print(f"gloo broadcast: {total:.0f} MB to {args.receivers} receivers in {seconds:.2f} s "
          f"= {total / seconds:.0f} MB/s per receiver (bucket {args.bucket_mb} MB, checksums included, "
          f"{'blocking' if args.blocking_wait else 'polled'} wait)")


if __name__ == "__main__":
    main()
