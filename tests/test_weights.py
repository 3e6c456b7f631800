"""Tests for learner/weights.py: bucket planning, pack/unpack, checksums, gloo broadcast."""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time

import pytest
from pathlib import Path

import torch

from learner.weights import (
    post_abort,
    BroadcastTransport,
    TensorSpec,
    checksum,
    checksums_match,
    make_transport,
    pack,
    plan_buckets,
    unpack,
)

# --------------------------------------------------------------------------- plan_buckets


def _names(buckets):
    return [[s.name for s in b] for b in buckets]


def test_tensor_spec_numel():
    assert TensorSpec("a", (2, 3, 4)).numel == 24
    assert TensorSpec("scalar", ()).numel == 1


def test_plan_buckets_keeps_order_and_respects_bound():
    # element_size 4, bound 40 bytes = 10 elements.
    specs = [TensorSpec("a", (4,)), TensorSpec("b", (3, 2)), TensorSpec("c", (5,)), TensorSpec("d", (2, 2)),
             TensorSpec("e", (1,)), TensorSpec("f", (10,))]
    buckets = plan_buckets(specs, bucket_bytes=40, element_size=4)
    # a(4)+b(6)=10 fits exactly; c(5)+d(4)+e(1)=10; f(10) alone.
    assert _names(buckets) == [["a", "b"], ["c", "d", "e"], ["f"]]
    flat = [s for b in buckets for s in b]
    assert flat == specs  # order kept, nothing lost or duplicated
    for b in buckets:
        assert sum(s.numel for s in b) * 4 <= 40


def test_plan_buckets_oversized_tensor_alone():
    specs = [TensorSpec("small1", (2,)), TensorSpec("huge", (100,)), TensorSpec("small2", (2,)),
             TensorSpec("small3", (3,))]
    buckets = plan_buckets(specs, bucket_bytes=16, element_size=2)  # 8 elements per bucket
    assert _names(buckets) == [["small1"], ["huge"], ["small2", "small3"]]
    # Only a bucket holding a single tensor may exceed the bound.
    for b in buckets:
        if sum(s.numel for s in b) * 2 > 16:
            assert len(b) == 1 and b[0].name == "huge"


def test_plan_buckets_empty():
    assert plan_buckets([], bucket_bytes=10, element_size=4) == []


# --------------------------------------------------------------------------- pack / unpack


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(3, 4, generator=g),
        "b1": torch.randn(4, generator=g),
        "w2": torch.randn(2, 2, 2, generator=g),
        "s": torch.randn((), generator=g),
    }


def test_pack_unpack_round_trip_float32():
    ts = _tensors()
    bucket = [TensorSpec(n, tuple(t.shape)) for n, t in ts.items()]
    numel = sum(s.numel for s in bucket)
    buf = pack(ts.values(), numel, torch.float32, "cpu")
    assert buf.shape == (numel,) and buf.dtype == torch.float32
    out = list(unpack(buf, bucket))
    assert [n for n, _ in out] == list(ts)
    for (name, view), (_, ref) in zip(out, ts.items()):
        assert view.shape == ref.shape
        assert torch.equal(view, ref), name
    # pack copies: mutating the source does not change the buffer.
    ts["b1"].zero_()
    assert not torch.equal(dict(unpack(buf, bucket))["b1"], ts["b1"])


def test_pack_unpack_round_trip_bfloat16_cast():
    ts = _tensors()
    bucket = [TensorSpec(n, tuple(t.shape)) for n, t in ts.items()]
    numel = sum(s.numel for s in bucket)
    buf = pack(ts.values(), numel, torch.bfloat16, "cpu")
    assert buf.dtype == torch.bfloat16
    for (name, view), (_, ref) in zip(unpack(buf, bucket), ts.items()):
        assert view.dtype == torch.bfloat16 and view.shape == ref.shape
        assert torch.equal(view, ref.to(torch.bfloat16)), name
    # Values exactly representable in bf16 survive the cast unchanged.
    exact = [torch.tensor([1.0, -2.5, 0.125]), torch.tensor([[3.0, 256.0]])]
    b2 = [TensorSpec("x", (3,)), TensorSpec("y", (1, 2))]
    got = dict(unpack(pack(exact, 5, torch.bfloat16, "cpu"), b2))
    assert got["x"].float().tolist() == [1.0, -2.5, 0.125]
    assert got["y"].float().tolist() == [[3.0, 256.0]]


def test_pack_into_a_reused_buffer():
    """The learner packs every bucket of a sync into the front of one buffer."""
    ts = _tensors()
    bucket = [TensorSpec(n, tuple(t.shape)) for n, t in ts.items()]
    numel = sum(s.numel for s in bucket)
    space = torch.full((numel + 5,), 7.0)
    buf = pack(ts.values(), numel, torch.float32, "cpu", out=space)
    assert buf.data_ptr() == space.data_ptr() and buf.shape == (numel,)
    for (name, view), (_, ref) in zip(unpack(buf, bucket), ts.items()):
        assert torch.equal(view, ref), name
    assert space[numel:].tolist() == [7.0] * 5


def test_pack_wrong_numel_fails():
    with pytest.raises((AssertionError, RuntimeError)):
        pack([torch.ones(3)], 5, torch.float32, "cpu")


# --------------------------------------------------------------------------- checksums


def _reference_checksum(buf: torch.Tensor) -> tuple[int, int]:
    """The definition, in plain Python: little-endian int64 words (the last one zero-padded), their
    sum and their sum weighted by (index mod 127) + 1, both modulo 2^64 as signed int64."""
    data = bytes(buf.reshape(-1).view(torch.uint8).tolist())
    data += bytes(-len(data) % 8)
    words = [int.from_bytes(data[i:i + 8], "little", signed=True) for i in range(0, len(data), 8)]
    signed = lambda v: (v + (1 << 63)) % (1 << 64) - (1 << 63)  # noqa: E731
    return signed(sum(words)), signed(sum(w * (i % 127 + 1) for i, w in enumerate(words)))


def test_checksum_values_by_hand():
    # int64 words 1, 2, 3: sum 6; weights (index % 127) + 1 = 1, 2, 3 -> 1 + 4 + 9 = 14
    assert checksum(torch.tensor([1, 2, 3], dtype=torch.int64)) == (6, 14)
    # fp32 1.0 is 0x3F800000: with 0.0 after it, one little-endian word 0x3F800000 (weight 1)
    assert checksum(torch.tensor([1.0, 0.0])) == (0x3F800000, 0x3F800000)
    # 6 bytes: one word, zero-padded: 1 + 2 * 2^16 + 3 * 2^32
    assert checksum(torch.tensor([1, 2, 3], dtype=torch.int16)) == (1 + (2 << 16) + (3 << 32),) * 2
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    assert checksum(x.to(torch.bfloat16)) != checksum(x.to(torch.float16))  # the bits, not the values


@pytest.mark.parametrize("numel", [0, 1, 3, 254, 255, 256, 1016, 1017, 5001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_checksum_matches_the_definition(numel, dtype):
    """Across the 127-word rows, the tail words, a partial last word, and wrapping past 2^63."""
    x = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 1e9).to(dtype)
    assert checksum(x) == _reference_checksum(x)
    assert checksum(x.view(torch.uint8)) == checksum(x)  # the bytes, not the dtype
    if numel > 1:
        assert checksum(x[1:]) == _reference_checksum(x[1:])  # unaligned views too


def test_checksum_has_no_full_size_temporaries(tmp_path):
    """A widened (int64 or float64) copy of a 256 MiB bf16 buffer would add 1 GiB; int64 views add nothing."""
    script = (
        "import resource, torch\nfrom learner.weights import checksum\n"
        "x = torch.ones(128 << 20, dtype=torch.bfloat16)\nx.view(torch.int16).sum()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nchecksum(x)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    import subprocess
    import sys

    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                   cwd=Path(__file__).resolve().parent.parent).stdout)
    assert grown_kib < 16 << 10, f"checksum grew the process by {grown_kib >> 10} MiB"


def test_checksum_equal_for_equal_buffers():
    a = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert checksum(a) == checksum(a.clone())


def test_checksum_order_sensitive():
    a = torch.arange(10, dtype=torch.float32)
    b = a.clone()
    b[2:4], b[4:6] = a[4:6], a[2:4]  # swap two whole 8-byte words
    ca, cb = checksum(a), checksum(b)
    assert ca[0] == cb[0]  # the plain sum cannot see a swap
    assert ca[1] != cb[1]  # the weighted sum does
    assert not checksums_match([ca], [cb])


def test_checksum_value_change():
    a = torch.ones(300)
    b = a.clone()
    b[299] = 1.5
    assert checksum(a) != checksum(b)
    assert not checksums_match([checksum(a)], [checksum(b)])


def test_checksums_match_is_exact_and_checks_length():
    a = [(1000, 5000), (1, 2)]
    assert checksums_match(a, [list(x) for x in a])  # JSON round trips turn tuples into lists
    assert not checksums_match([(1000, 5000)], [(1001, 5000)])
    assert not checksums_match(a, a[:1])
    assert not checksums_match([], a)
    assert checksums_match([], [])


# --------------------------------------------------------------------------- BroadcastTransport (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "test-group-secret"

BUFFERS = [  # (numel, dtype) of the three broadcast buffers
    (10, torch.float32),
    (7, torch.bfloat16),
    (1000, torch.float32),
]


def _sender_buffers() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(n, generator=g).to(dtype) for n, dtype in BUFFERS]


def _receiver(port: int, rank: int, world_size: int, queue, backend: str) -> None:
    try:
        t = make_transport(backend, "127.0.0.1", port, rank, world_size, generation=1, timeout_s=60, secret=SECRET)
        sums, values = [], []
        for numel, dtype in BUFFERS:
            buf = torch.zeros(numel, dtype=dtype)
            t.recv(buf)
            sums.append(checksum(buf))
            values.append(buf.float().tolist())
        t.close()
        queue.put((rank, sums, values, None))
    except Exception as e:  # report instead of hanging the parent
        queue.put((rank, None, None, repr(e)))


@pytest.mark.parametrize("backend", ["gloo", "shared"])
def test_transport_to_two_receivers(backend):
    """The broadcast group (gloo; NCCL on GPU) and shared memory (CUDA IPC on GPU) deliver the same
    bits through the same interface."""
    ctx = mp.get_context("spawn")
    port, world = _free_port(), 3
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, r, world, queue, backend), daemon=True) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        sender = make_transport(backend, "127.0.0.1", port, 0, world, generation=1, timeout_s=60, secret=SECRET)
        bufs = _sender_buffers()
        sent = []
        for buf in bufs:
            sender.send(buf)
            sent.append(checksum(buf))
        results = sorted(queue.get(timeout=90) for _ in procs)
        sender.close()
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [r[0] for r in results] == [1, 2]
    for rank, sums, values, err in results:
        assert err is None, f"receiver {rank}: {err}"
        assert sums == sent
        assert checksums_match(sums, sent)
        assert values == [b.float().tolist() for b in bufs]
    # the sender's buffers are left unchanged by sending
    assert [checksum(b) for b in _sender_buffers()] == sent


def test_broadcast_sender_times_out_without_receiver():
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        BroadcastTransport("127.0.0.1", _free_port(), 0, 2, "gloo", timeout_s=3, secret=SECRET)
    elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed
    assert "time" in str(info.value).lower()  # "Timed out ... waiting for clients"


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown broadcast backend"):
        BroadcastTransport("127.0.0.1", _free_port(), 0, 1, "mpi", timeout_s=3, secret=SECRET)


def _stalled_receiver(port: int, rank: int, world_size: int, started, joined, release) -> None:
    """Joins the group, then never receives: a hung engine (alive, answering nothing)."""
    started.set()  # torch is imported: the join below is quick, even on a loaded machine
    t = make_transport("gloo", "127.0.0.1", port, rank, world_size, generation=1, timeout_s=60, secret=SECRET)
    joined.set()
    release.wait(120)
    t.close()


def _send_to_a_stalled_receiver(timeout_s: float, abort_after_s: float | None, secret: str = SECRET):
    """Send 64 MiB (more than the sockets buffer) to one receiver that never receives; the driver
    (this test) posts an abort after `abort_after_s`, signed with `secret`. Returns (error, seconds)."""
    ctx = mp.get_context("spawn")
    port, started, joined, release = _free_port(), ctx.Event(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_stalled_receiver, args=(port, 1, 2, started, joined, release), daemon=True)
    proc.start()
    try:
        assert started.wait(120)
        sender = make_transport("gloo", "127.0.0.1", port, 0, 2, generation=1, timeout_s=timeout_s, secret=SECRET)
        assert joined.wait(60)
        if abort_after_s is not None:
            threading.Timer(abort_after_s, post_abort, ("127.0.0.1", port, 1, secret, "engine 1 died")).start()
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            sender.send(torch.ones(16 << 20))
        elapsed = time.monotonic() - start
        with pytest.raises(RuntimeError, match="closed"):  # the aborted group is not used again
            sender.send(torch.ones(4))
        return str(info.value), elapsed
    finally:
        release.set()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()


def test_a_send_to_a_hung_receiver_stops_at_its_deadline_on_the_cpu():
    """NCCL's `wait()` never blocks the CPU; the transport waits on the CPU itself (same path on gloo)."""
    why, elapsed = _send_to_a_stalled_receiver(timeout_s=3, abort_after_s=None)
    assert "timed out after 3 s" in why and "the group is aborted" in why
    assert 3 <= elapsed < 10, elapsed


def test_the_drivers_abort_stops_a_waiting_member_at_once():
    why, elapsed = _send_to_a_stalled_receiver(timeout_s=60, abort_after_s=1.0)
    assert "aborted by the driver: engine 1 died" in why
    assert elapsed < 5, elapsed  # not the 60 s deadline


def test_an_abort_not_signed_by_the_driver_is_ignored():
    why, elapsed = _send_to_a_stalled_receiver(timeout_s=4, abort_after_s=0.5, secret="someone else")
    assert "timed out after 4 s" in why and elapsed >= 4
