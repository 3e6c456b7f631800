"""The weight-sync store as an attacker on the network sees it (CPU, no vLLM): it listens only on
the group's address; a client without the group's secret cannot join, and what it writes into the
store — a pickle under the very key a receiver reads — runs nothing and is refused."""

from __future__ import annotations

import json
import os
import pickle
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from learner.group_store import SignedStore, join_store
from learner.weights import SharedTransport, _share, checksum, make_transport

SECRET = "a0" * 32


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening() -> list[tuple[str, int, int]]:
    """(address, port, inode) of every listening TCP socket (IPv4 and IPv6), from /proc/net."""
    found = []
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                addr, port_hex = fields[1].split(":")
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
                found.append((socket.inet_ntop(family, raw), int(port_hex, 16), int(fields[9])))
    return found


def _listeners(port: int) -> list[str]:
    """Addresses listening on `port`."""
    return [addr for addr, p, _ in _listening() if p == port]


def _own_listeners() -> set[tuple[str, int]]:
    """(address, port) of the sockets this process listens on."""
    fds = Path("/proc/self/fd")
    inodes = {os.readlink(fd) for fd in fds.iterdir() if fd.exists()}
    return {(addr, port) for addr, port, inode in _listening() if f"socket:[{inode}]" in inodes}


def _in_thread(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in a thread; returns a function that joins it and gives (result, error)."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - handed back to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout: float = 30.0):
        thread.join(timeout)
        assert not thread.is_alive(), f"{fn.__name__} still running after {timeout} s"
        return out.get("result"), out.get("error")
    return join


def _join(host, port, rank, secret, timeout_s=10.0, world_size=2):
    return join_store(host, port, rank, world_size, "test-0", secret, timedelta(seconds=timeout_s))


# --------------------------------------------------------------------------- where the store listens


def test_store_listens_only_on_the_groups_address():
    """Bound to 127.0.0.2 (loopback, but not 127.0.0.1): one listener, on that address, none on a
    wildcard (TCPStore's own server listens on :: whatever host it is given); 127.0.0.1 is refused."""
    host = "127.0.0.2"
    port = _free_port(host)
    root = _in_thread(_join, host, port, 0, SECRET)
    deadline = time.monotonic() + 10
    while not _listeners(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _listeners(port) == [host]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    member = _in_thread(_join, host, port, 1, SECRET)
    (_, root_err), (_, member_err) = root(), member()
    assert root_err is None and member_err is None, (root_err, member_err)


def test_gloo_listens_on_the_groups_address_too():
    """gloo's own per-rank listeners: the root's on the group's address (127.0.0.2), the member's
    on its address towards the root (loopback: 127.0.0.1), none on a wildcard."""
    host, port = "127.0.0.2", _free_port("127.0.0.2")
    before = _own_listeners()
    member = _in_thread(make_transport, "gloo", host, port, 1, 2, 0, 20.0, secret=SECRET)
    root = make_transport("gloo", host, port, 0, 2, 0, 20.0, secret=SECRET)
    member_t, err = member()
    assert err is None, err
    opened = sorted(addr for addr, _ in _own_listeners() - before)
    root.close(), member_t.close()
    assert opened == ["127.0.0.1", "127.0.0.2", "127.0.0.2"], opened  # member's gloo; the store and root's gloo


# --------------------------------------------------------------------------- who may join


def test_wrong_secret_is_refused_naming_the_rank():
    port = _free_port()
    start = time.monotonic()
    root = _in_thread(_join, "127.0.0.1", port, 0, SECRET)
    member = _in_thread(_join, "127.0.0.1", port, 1, "b1" * 32)
    (_, root_err), (_, member_err) = root(), member()
    assert time.monotonic() - start < 10, "refused only after the timeout"
    assert isinstance(root_err, PermissionError) and "rank 1 gave a wrong proof" in str(root_err)
    assert isinstance(member_err, PermissionError) and "rank 1 refused" in str(member_err) \
        and "wrong proof" in str(member_err), member_err  # the root's reason, unsigned for this member's secret
    assert SECRET not in str(root_err) + str(member_err)


def test_client_without_the_secret_cannot_join():
    """A store client that only connects, or that writes a made-up proof under the member's key:
    the root refuses, naming rank 1, within its timeout."""
    port = _free_port()
    start = time.monotonic()
    root = _in_thread(_join, "127.0.0.1", port, 0, SECRET, 3.0)
    intruder = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10))  # connected, silent
    _, err = root()
    assert isinstance(err, TimeoutError) and "rank(s) 1 to join" in str(err), err
    assert time.monotonic() - start < 10

    port = _free_port()
    root = _in_thread(_join, "127.0.0.1", port, 0, SECRET, 10.0)
    intruder = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10))
    intruder.wait(["raygrpo-join-test-0/nonce"])  # the handshake's keys are public: list_keys shows them
    intruder.set("raygrpo-join-test-0/proof/1", "00" * 32)
    _, err = root()
    assert isinstance(err, PermissionError) and "rank 1 gave a wrong proof" in str(err), err


def test_member_refuses_a_root_without_the_secret():
    """Whoever hosts the port (a squatter on it) cannot pose as the root: its verdict is not signed."""
    port = _free_port()
    fake = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=10), wait_for_workers=False)
    fake.set("raygrpo-join-test-0/nonce", "1234")
    member = _in_thread(_join, "127.0.0.1", port, 1, SECRET)
    fake.wait(["raygrpo-join-test-0/proof/1"])
    fake.set("raygrpo-join-test-0/verdict", b"\0" * 32 + b"admitted")
    _, err = member()
    assert isinstance(err, PermissionError) and "verdict (admitted) is not signed" in str(err), err


# --------------------------------------------------------------------------- shared memory: no pickle


def _signed_prefix(name: str) -> str:
    """Where a group's signed keys live. The name derives from the secret, but it is no secret: any
    store client lists the keys while a sync runs. The intruders below know it from the start."""
    return SignedStore(dist.HashStore(), f"raygrpo-{name}", SECRET)._prefix


class Evil:
    """What an attacker would post as a bucket: unpickling it creates `path`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _shared_receiver(port: int, numel: int, queue) -> None:
    try:
        t = SharedTransport("127.0.0.1", port, 1, 2, generation=0, timeout_s=30, secret=SECRET)
        queue.put(("joined", None))
        t.recv(torch.zeros(numel))
        queue.put(("received", None))
    except Exception as err:  # noqa: BLE001 - reported to the test
        queue.put((type(err).__name__, str(err)))


def test_forged_bucket_runs_no_code_in_the_receiver(tmp_path):
    """An intruder lists the store's keys, so it knows the bucket key, and writes first a pickle
    whose unpickling would create a marker file, then a well-formed record of its own shared tensor:
    the receiver unpickles nothing, maps nothing, and refuses with a clear error."""
    marker = tmp_path / "pwned"
    ctx = mp.get_context("spawn")
    port, queue = _free_port(), ctx.Queue()
    proc = ctx.Process(target=_shared_receiver, args=(port, 4, queue), daemon=True)
    proc.start()
    try:
        root = SharedTransport("127.0.0.1", port, 0, 2, generation=0, timeout_s=30, secret=SECRET)
        assert queue.get(timeout=60) == ("joined", None)
        intruder = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10))
        prefix = _signed_prefix("shared-0")
        intruder.set(prefix + "bucket/0", pickle.dumps(Evil(str(marker))))
        kind, message = queue.get(timeout=30)
        root.close()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert not marker.exists(), "the receiver unpickled what the intruder wrote"
    assert kind == "PermissionError" and "'bucket/0' is not signed" in message, (kind, message)


def test_forged_record_is_refused_before_mapping():
    """A record shaped like the sender's, pointing at the intruder's own shared tensor, fails the
    signature check: the receiver would otherwise load the intruder's weights."""
    port = _free_port()
    root = _in_thread(SharedTransport, "127.0.0.1", port, 0, 2, 0, 10.0, secret=SECRET)
    receiver = SharedTransport("127.0.0.1", port, 1, 2, 0, 10.0, secret=SECRET)
    assert root()[1] is None
    intruder = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10))
    prefix = _signed_prefix("shared-0")
    theirs = torch.full((4,), 666.0).share_memory_()
    intruder.set(prefix + "bucket/0", json.dumps(_share(theirs)))
    buf = torch.zeros(4)
    with pytest.raises(PermissionError, match="'bucket/0' is not signed"):
        receiver.recv(buf)
    assert buf.tolist() == [0.0] * 4


# --------------------------------------------------------------------------- the honest path still works


BUCKETS = [(1000, torch.float32), (7, torch.bfloat16), (4096, torch.float32), (33, torch.float16), (1, torch.float32)]


def _buckets() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, generator=g).to(dtype) for n, dtype in BUCKETS]


def _receiver(backend: str, port: int, queue) -> None:
    try:
        t = make_transport(backend, "127.0.0.1", port, 1, 2, generation=3, timeout_s=60, secret=SECRET)
        got = []
        for n, dtype in BUCKETS:
            buf = torch.zeros(n, dtype=dtype)
            t.recv(buf)
            got.append((checksum(buf), buf.view(torch.uint8).tolist()))
        t.close()
        queue.put(("ok", got))
    except Exception as err:  # noqa: BLE001
        queue.put(("error", repr(err)))


@pytest.mark.parametrize("backend", ["gloo", "shared"])
def test_several_buckets_arrive_exactly(backend):
    ctx = mp.get_context("spawn")
    port, queue = _free_port(), ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(backend, port, queue), daemon=True)
    proc.start()
    try:
        sender = make_transport(backend, "127.0.0.1", port, 0, 2, generation=3, timeout_s=60, secret=SECRET)
        sent = _buckets()
        for buf in sent:
            sender.send(buf)
        status, got = queue.get(timeout=90)
        sender.close()
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", got
    assert [s for s, _ in got] == [checksum(b) for b in sent]
    assert [raw for _, raw in got] == [b.view(torch.uint8).tolist() for b in sent]
