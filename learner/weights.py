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

Every group forms through `learner.group_store` (members prove the group's secret; every value
read back is signed), so nothing read from the store is unpickled or trusted unsigned.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from learner.group_store import SignedStore, join_store, local_address


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


def pack(tensors: Iterable[torch.Tensor], numel: int, dtype: torch.dtype, device,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy tensors, flattened and cast to `dtype`, into one flat buffer of `numel` elements: the
    first `numel` elements of `out` (reused between buckets), else a new one."""
    buf = torch.empty(numel, dtype=dtype, device=device) if out is None else out[:numel]
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


CHECKSUM_PERIOD = 127  # words per row of the position-weighted sum (odd: no power-of-two aliasing)


def checksum(buf: torch.Tensor) -> tuple[int, int]:
    """`device_checksum` read back: (sum, position-weighted sum) as Python ints."""
    total, weighted = device_checksum(buf).tolist()
    return total, weighted


def read_checksums(sums: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Per-bucket `device_checksum`s read back in one transfer (one host wait per sync, not per bucket)."""
    return [tuple(pair) for pair in torch.stack(sums).tolist()] if sums else []


def device_checksum(buf: torch.Tensor) -> torch.Tensor:
    """[2] int64 on the buffer's device: (sum, position-weighted sum) of the buffer's bytes read as int64 words, modulo 2^64.

    Integer sums are exact and independent of reduction order (int64 addition wraps, and wrapping
    addition is associative), so sender and receiver agree bit for bit on any device; the weights
    (word index mod 127, plus 1) make the second sum sensitive to order. One pass over the
    buffer and no temporaries: the words, as rows of 127, are summed per column (column j weighs
    j + 1); the last < 127 words and the last < 8 bytes (zero-padded to a word) follow them.
    Reading whole 8-byte words needs no widening copy: ~40x faster than summing int16 words
    widened to int64, which cost seconds per sync of a 135M-parameter fp32 model."""
    raw = buf.detach().reshape(-1).view(torch.uint8)
    if raw.data_ptr() % 8:
        raw = raw.clone()  # int64 views need 8-byte alignment
    n = raw.numel() // 8
    words = raw[:8 * n].view(torch.int64)
    rows = n - n % CHECKSUM_PERIOD
    columns = words[:rows].view(-1, CHECKSUM_PERIOD).sum(0)
    last = torch.zeros(8, dtype=torch.uint8, device=raw.device)
    last[:raw.numel() - 8 * n] = raw[8 * n:]
    tail = torch.cat([words[rows:], last.view(torch.int64)])
    weights = torch.arange(1, CHECKSUM_PERIOD + 1, dtype=torch.int64, device=raw.device)
    total = columns.sum() + tail.sum()
    weighted = (columns * weights).sum() + (tail * weights[:tail.numel()]).sum()
    return torch.stack([total, weighted])


def checksums_match(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    """Exact equality of two per-bucket checksum lists."""
    return [tuple(x) for x in a] == [tuple(x) for x in b]


# --------------------------------------------------------------------------- rendezvous


BACKEND_GRACE_S = 30.0  # NCCL's and gloo's own collective timeout is our deadline plus this


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

    Every broadcast is waited for on the CPU, up to `timeout_s`, by polling its work: NCCL's
    `Work.wait()` only makes the current stream wait, so a dead receiver would never raise in
    `send` (the healthy members would stall until the watchdog). Meanwhile the member watches the
    group's store for the driver's signed abort (`post_abort`: it saw a member die), so the healthy
    ones give up at once rather than at their deadline. Either way the group is aborted and the
    call raises; gloo and NCCL take the same path.
    """

    POLL_S = (5e-5, 5e-3)  # first and longest sleep between two looks at a broadcast in flight
    ABORT_EVERY_S = 0.05  # how often a waiting member reads the store for the driver's abort

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str,
                 generation: int = 0, timeout_s: float = 300.0, *, secret: str):
        timeout = timedelta(seconds=timeout_s)
        self.store, store = join_store(host, port, rank, world_size, f"weights-{generation}", secret, timeout)
        self.signed = store  # the process group holds it; kept alive with the transport
        # The backend's own deadline sits past ours (`timeout_s`, waited for on the CPU in `_wait`),
        # so a stalled broadcast always ends in our TimeoutError, never in a race with the
        # backend's error. NCCL's watchdog is the backstop for a collective we could not abort, and
        # it aborts without killing the process (TORCH_NCCL_ASYNC_ERROR_HANDLING=2 in the job's
        # environment).
        backend_timeout = timeout + timedelta(seconds=BACKEND_GRACE_S)
        if backend == "nccl":  # GPU-only path
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = backend_timeout
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        elif backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = backend_timeout
            # gloo's own listeners on this rank's address towards the root (by default it binds to
            # whatever the hostname resolves to), like the store
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address(host) if rank else host)]
            self.group = dist.ProcessGroupGloo(store, rank, world_size, opts)
        else:
            raise ValueError(f"unknown broadcast backend {backend!r}")
        self.rank, self.backend, self.timeout_s = rank, backend, timeout_s

    def _broadcast(self, buf: torch.Tensor) -> None:
        if self.group is None:
            raise RuntimeError("the weight-broadcast group was closed (an earlier broadcast failed)")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._wait(self.group.broadcast([buf], opts))

    def _wait(self, work) -> None:
        """Return once `work` completed on the device; abort the group and raise on the deadline or
        on the driver's abort."""
        start = last_look = time.monotonic()
        pause = self.POLL_S[0]
        while not work.is_completed():
            now = time.monotonic()
            why = None
            if now - start > self.timeout_s:
                why = f"timed out after {self.timeout_s:g} s"
            elif now - last_look > self.ABORT_EVERY_S:
                last_look = now
                why = self._abort_posted()
            if why is not None:
                self.close()
                raise TimeoutError(f"weight broadcast on rank {self.rank} {why}; the group is aborted")
            time.sleep(pause)
            pause = min(2 * pause, self.POLL_S[1])
        work.wait()  # raises the collective's own error, if it had one

    def _abort_posted(self) -> str | None:
        if not self.signed.check([ABORT_KEY]):
            return None
        try:
            return f"aborted by the driver: {self.signed.get(ABORT_KEY).decode(errors='replace')}"
        except PermissionError:  # anyone can write the store; only the driver's abort counts
            return None

    def send(self, buf: torch.Tensor) -> None:
        assert self.rank == 0, "only rank 0 sends"
        self._broadcast(buf)

    def recv(self, buf: torch.Tensor) -> None:
        self._broadcast(buf)

    def close(self) -> None:
        """Leave the group, aborted (a replaced generation or a failed sync must not leave a
        communicator waiting on a lost peer)."""
        held, self.group = [self.group], None
        if held[0] is not None:
            held[0].abort()
            # a gloo group's destructor joins its threads, which may sit in the aborted collective
            # until gloo's own timeout: its last reference is dropped in a thread of its own
            threading.Thread(target=held.clear, name="raygrpo-group-release", daemon=True).start()
        self.store = self.signed = None


ABORT_KEY = "abort"


def post_abort(host: str, port: int, generation: int, secret: str, why: str, timeout_s: float = 5.0) -> bool:
    """The driver's side of an abort: post `why`, signed, in broadcast group `generation`'s store
    at `host`:`port`; every member waiting in a broadcast aborts the group within
    `BroadcastTransport.ABORT_EVERY_S`. Returns False if the store could not be reached (its root
    is gone: the members fail on their own)."""
    try:
        store = dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - the root died with its store
        return False
    SignedStore(store, f"raygrpo-weights-{generation}", secret).set(ABORT_KEY, why.encode())
    return True


class SharedTransport(WeightTransport):
    """Between processes on one device (colocated engine and learner): no collective library.

    The sender shares each buffer — a shared-memory file on CPU, a CUDA IPC handle on GPU — and
    posts where it lives as a small signed JSON record (`_share`) in the group's store; every
    receiver checks the signature, maps the buffer (`_open`), copies it out and acknowledges (signed
    too) before `send` returns (the sender may then reuse it). Nothing read from the store is
    unpickled. Receivers must see the sender's device: colocated processes on one GPU do."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, generation: int = 0,
                 timeout_s: float = 300.0, *, secret: str):
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy("file_system")  # files any local process can open
        self.timeout = timedelta(seconds=timeout_s)
        self._root_store, self.store = join_store(host, port, rank, world_size, f"shared-{generation}", secret,
                                                  self.timeout)  # the raw store hosts the server on rank 0
        self.rank, self.world_size, self.count = rank, world_size, 0

    def send(self, buf: torch.Tensor) -> None:
        assert self.rank == 0, "only rank 0 sends"
        shared = buf if buf.is_cuda else buf.share_memory_()
        key, self.count = f"bucket/{self.count}", self.count + 1
        self.store.set(key, json.dumps(_share(shared)))
        done = [f"{key}/done/{r}" for r in range(1, self.world_size)]
        self.store.wait(done, self.timeout)
        for k in done:
            self.store.get(k)  # a forged acknowledgement raises: the buffer may still be in use
        for k in (key, *done):
            self.store.delete_key(k)

    def recv(self, buf: torch.Tensor) -> None:
        key, self.count = f"bucket/{self.count}", self.count + 1
        self.store.wait([key], self.timeout)
        shared = _open(json.loads(self.store.get(key)), buf)  # `get` checks the signature first
        buf.copy_(shared)
        if buf.is_cuda:
            torch.cuda.current_stream(buf.device).synchronize()
        del shared
        self.store.set(f"{key}/done/{self.rank}", b"1")

    def close(self) -> None:
        self.store = self._root_store = None


def _share(t: torch.Tensor) -> dict:
    """Where the shared 1-D tensor `t` lives, as plain JSON-able values: its shared-memory file
    (CPU, file_system strategy) or its CUDA IPC handles, and its dtype, size and storage offset.

    No reference is added for the receivers: the sender keeps `t` alive until every receiver has
    acknowledged, and each receiver's mapping holds its own reference while it copies."""
    storage = t.untyped_storage()
    desc = dict(dtype=str(t.dtype).removeprefix("torch."), numel=t.numel(), offset=t.storage_offset())
    if t.is_cuda:  # untested here (no GPU on the CI machines): mirrors torch's reduce_tensor for CUDA
        device, handle, size, offset_bytes, counter, counter_offset, event, sync = storage._share_cuda_()
        return desc | dict(kind="cuda", device=device, handle=handle.hex(), nbytes=size, offset_bytes=offset_bytes,
                           counter=counter.hex(), counter_offset=counter_offset,
                           event=event.hex() if event else None, sync=bool(sync))
    manager, handle, size = storage._share_filename_cpu_()
    return desc | dict(kind="cpu", manager=manager.decode(), handle=handle.decode(), nbytes=size)


def _open(desc: dict, like: torch.Tensor) -> torch.Tensor:
    """The sender's tensor that `desc` (from `_share`) describes, mapped into this process: [numel]
    of `like`'s dtype on `like`'s device. A record that does not fit `like` raises ValueError."""
    dtype = getattr(torch, str(desc.get("dtype")), None)
    numel, offset, nbytes = desc.get("numel"), desc.get("offset"), desc.get("nbytes")
    kind = "cuda" if like.is_cuda else "cpu"
    if dtype != like.dtype or numel != like.numel() or desc.get("kind") != kind \
            or not all(isinstance(v, int) and v >= 0 for v in (offset, nbytes)) \
            or (offset + numel) * like.element_size() > nbytes:
        raise ValueError(f"shared bucket record does not fit the receiving buffer "
                         f"({like.numel()} x {like.dtype} on {kind}): {desc}")
    if kind == "cuda":  # untested here (no GPU on the CI machines): torch's own rebuild, typed arguments only
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        return rebuild_cuda_tensor(torch.Tensor, (numel,), (1,), offset, torch.storage.TypedStorage, dtype,
                                   int(desc["device"]), bytes.fromhex(desc["handle"]), nbytes,
                                   int(desc["offset_bytes"]), False, bytes.fromhex(desc["counter"]),
                                   int(desc["counter_offset"]), desc["event"] and bytes.fromhex(desc["event"]),
                                   bool(desc["sync"]))
    storage = torch.UntypedStorage._new_shared_filename_cpu(str(desc["manager"]).encode(),
                                                           str(desc["handle"]).encode(), nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, offset, (numel,), (1,))


def make_transport(backend: str, host: str, port: int, rank: int, world_size: int, generation: int = 0,
                   timeout_s: float = 300.0, *, secret: str) -> WeightTransport:
    """`gloo` / `nccl`: a broadcast group; `shared`: shared memory between colocated processes.
    `secret`: the group's (`learner.group_store.new_secret`), the same for every member."""
    if backend == "shared":
        return SharedTransport(host, port, rank, world_size, generation, timeout_s, secret=secret)
    return BroadcastTransport(host, port, rank, world_size, backend, generation, timeout_s, secret=secret)
