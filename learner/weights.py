"""Weight transport: full tensors from learner rank 0 to every vLLM worker, bucket by bucket.

Both sides derive the same bucket plan from a manifest of (name, shape) sent once when the
group forms, so a sync moves only flat buffers: the sender packs up to `bucket_bytes` of tensors
into one buffer, every receiver unpacks views of the same layout. Each side computes an exact
integer checksum of every buffer it sent or received; the driver compares them, so a broken or
stale transfer is an error, never a silently stale engine.

The group is a dedicated torch.distributed process group built from a TCPStore, independent of
either side's default group: gloo on CPU, NCCL on GPU — the same code path on both. Colocated
processes (an engine and a learner rank on one device) use `SharedTransport` instead: the same
send/recv of flat buffers through shared memory (CUDA IPC on GPU), with the TCPStore as mailbox. A group is
named by a generation, so it can be rebuilt with a different membership (an actor replaced,
added or removed) without touching the learner's own world.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def plan_buckets(specs: list[TensorSpec], bucket_bytes: int, element_size: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a larger tensor goes alone)."""
    buckets: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        nbytes = spec.numel * element_size
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: Iterable[torch.Tensor], numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Copy tensors, flattened and cast to `dtype`, into one new flat buffer of `numel` elements."""
    buf = torch.empty(numel, dtype=dtype, device=device)
    offset = 0
    for t in tensors:
        n = t.numel()
        buf[offset:offset + n].copy_(t.reshape(-1))
        offset += n
    assert offset == numel, f"packed {offset} elements into a bucket of {numel}"
    return buf


def unpack(buf: torch.Tensor, bucket: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, view) for every tensor of a bucket laid out by `pack`."""
    offset = 0
    for spec in bucket:
        yield spec.name, buf[offset:offset + spec.numel].view(spec.shape)
        offset += spec.numel


# Elements per checksum step: a multiple of the weight period 127, so one weight vector serves
# every chunk; its int64 temporaries are 32 MiB, whatever the size of the tensor.
CHECKSUM_PERIOD = 127
CHECKSUM_CHUNK = CHECKSUM_PERIOD << 15


def checksum(buf: torch.Tensor) -> tuple[int, int]:
    """(sum, position-weighted sum) of the buffer's raw 16-bit words, as exact integers.

    Integer sums are exact and independent of reduction order, so sender and receiver agree bit
    for bit on any device; the weights (position mod 127, plus 1) make the second sum sensitive to
    order. Computed chunk by chunk: no full-size temporary (a float64 copy of a 545M-element
    embedding would take 4.4 GB of engine memory). Each chunk's sums fit int64 with room to spare:
    |word| < 2^15, weights <= 127, 2^22 words per chunk."""
    flat = buf.detach().reshape(-1)
    words = flat.view(torch.int16) if flat.element_size() % 2 == 0 else flat.view(torch.uint8)
    weights = torch.arange(min(CHECKSUM_CHUNK, words.numel()), device=words.device, dtype=torch.int64)
    weights = weights.remainder_(CHECKSUM_PERIOD).add_(1)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    weighted = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), CHECKSUM_CHUNK):
        chunk = words[start:start + CHECKSUM_CHUNK].to(torch.int64)
        total += chunk.sum()
        weighted += (chunk * weights[:chunk.numel()]).sum()
    return int(total), int(weighted)


def checksums_match(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    """Exact equality of two per-bucket checksum lists."""
    return [tuple(x) for x in a] == [tuple(x) for x in b]


NCCL_GRACE_S = 30.0  # NCCL's collective timeout is the driver's deadline plus this


class WeightTransport(ABC):
    """Moves one flat buffer from the sender (rank 0) to every receiver."""

    @abstractmethod
    def send(self, buf: torch.Tensor) -> None: ...

    @abstractmethod
    def recv(self, buf: torch.Tensor) -> None: ...

    def close(self) -> None:
        """Release the transport's resources."""


class BroadcastTransport(WeightTransport):
    """Broadcast over a dedicated gloo (CPU) or NCCL (GPU) process group.

    Rank 0 hosts the TCPStore; construction blocks until all `world_size` members joined, so every
    member must be constructed concurrently (the driver issues all joins before waiting on any).
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 generation: int = 0, timeout_s: float = 300.0):
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout)
        store = dist.PrefixStore(f"raygrpo-weights-{generation}", self.store)
        if backend == "nccl":
            # GPU-only path. NCCL's own deadline sits past the driver's (`timeout_s`), so the driver
            # reports a lost peer first (WeightSyncError); NCCL's watchdog then aborts the stuck
            # collective without killing the process (TORCH_NCCL_ASYNC_ERROR_HANDLING=2 in the job's
            # environment), and the next use of this group raises.
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout + timedelta(seconds=NCCL_GRACE_S)
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        elif backend == "gloo":
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout=timeout)
        else:
            raise ValueError(f"unknown broadcast backend {backend!r}")
        self.rank, self.backend = rank, backend

    def _broadcast(self, buf: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([buf], opts).wait()

    def send(self, buf: torch.Tensor) -> None:
        assert self.rank == 0, "only rank 0 sends"
        self._broadcast(buf)

    def recv(self, buf: torch.Tensor) -> None:
        self._broadcast(buf)

    def close(self) -> None:
        """Leave the group; an NCCL communicator is aborted explicitly (a replaced generation or a
        failed sync must not leave a communicator waiting on a lost peer)."""
        if self.backend == "nccl" and self.group is not None:
            self.group.abort()
        self.group = None
        self.store = None


class SharedTransport(WeightTransport):
    """Between processes on one device (colocated engine and learner): no collective library.

    The sender shares each buffer through torch's own tensor pickling — a CUDA IPC handle on GPU,
    a shared-memory file on CPU — and posts the handle in the group's TCPStore; every receiver
    copies the buffer out and acknowledges before `send` returns (the sender may then free it).
    Receivers must see the sender's device: colocated processes on one GPU do."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, generation: int = 0,
                 timeout_s: float = 300.0):
        import torch.distributed as dist
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy("file_system")  # files any local process can open
        self.timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=self.timeout)
        self.store = dist.PrefixStore(f"raygrpo-shared-{generation}", store)
        self._root_store = store  # the master must outlive the prefix view
        self.rank, self.world_size, self.count = rank, world_size, 0

    def send(self, buf: torch.Tensor) -> None:
        from multiprocessing.reduction import ForkingPickler

        assert self.rank == 0, "only rank 0 sends"
        shared = buf if buf.is_cuda else buf.share_memory_()
        key, self.count = f"bucket/{self.count}", self.count + 1
        self.store.set(key, bytes(ForkingPickler.dumps(shared)))
        done = [f"{key}/done/{r}" for r in range(1, self.world_size)]
        self.store.wait(done, self.timeout)
        for k in (key, *done):
            self.store.delete_key(k)

    def recv(self, buf: torch.Tensor) -> None:
        import pickle

        key, self.count = f"bucket/{self.count}", self.count + 1
        self.store.wait([key], self.timeout)
        shared = pickle.loads(self.store.get(key))
        buf.copy_(shared)
        if buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()
        del shared
        self.store.set(f"{key}/done/{self.rank}", b"1")

    def close(self) -> None:
        self.store = self._root_store = None


def make_transport(backend: str, host: str, port: int, rank: int, world_size: int, generation: int = 0,
                   timeout_s: float = 300.0) -> WeightTransport:
    """`gloo` / `nccl`: a broadcast group; `shared`: shared memory between colocated processes."""
    if backend == "shared":
        return SharedTransport(host, port, rank, world_size, generation, timeout_s)
    return BroadcastTransport(host, port, rank, world_size, backend, generation, timeout_s)
