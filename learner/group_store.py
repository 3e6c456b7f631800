"""The weight-broadcast group's rendezvous: a TCPStore that admits members who prove its secret.

The store listens only on the address the group uses, and it is open to anyone who reaches that
port: any client can list, read, overwrite and delete its keys. So every member proves the
group's secret (handed out by the driver through Ray) before the group forms (`join_store`), and
every value the group reads back is signed with it (`SignedStore`): a forged value is refused,
never handed to gloo, NCCL or a receiver, and nothing read from the store is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
from datetime import timedelta

import torch.distributed as dist


def new_secret() -> str:
    """A fresh group secret: the driver makes one per group generation and hands it to the members
    only through Ray calls. Never log it."""
    return secrets.token_hex(32)


def _mac(secret: str, *parts: str | bytes) -> bytes:
    """HMAC-SHA256 under `secret` of the parts, each length-prefixed (so no two part lists collide)."""
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.digest()


class SignedStore(dist.Store):
    """A namespaced view of the group's TCPStore whose values carry an HMAC of (key, value) under
    the group's secret. A client without the secret can still list, overwrite or delete keys (a
    denial of service: the sync fails and is reported), but what it writes never verifies: `get`
    refuses it. gloo and NCCL rendezvous through this view, so their peer addresses and NCCL's
    unique id are authenticated too; counters (`add`) are not signed."""

    TAG = 32  # bytes of HMAC-SHA256 in front of every value

    def __init__(self, store: dist.Store, name: str, secret: str):
        super().__init__()
        # keys live under a name derived from the secret: no collision with another run's keys
        # (not hidden: any client can list the keys)
        self._store, self._secret = store, secret
        self._prefix = f"{name}-{_mac(secret, 'namespace', name).hex()[:16]}/"

    def _tag(self, key: str, value: bytes) -> bytes:
        return _mac(self._secret, "value", self._prefix + key, value)

    def _signed(self, key: str, value: str | bytes) -> bytes:
        value = value.encode() if isinstance(value, str) else bytes(value)
        return self._tag(key, value) + value

    def set(self, key: str, value: str | bytes) -> None:
        self._store.set(self._prefix + key, self._signed(key, value))

    def get(self, key: str) -> bytes:
        raw = self._store.get(self._prefix + key)
        tag, value = raw[:self.TAG], raw[self.TAG:]
        if not hmac.compare_digest(tag, self._tag(key, value)):
            raise PermissionError(f"store value {key!r} is not signed with this group's secret: refused "
                                  "(another client of the store wrote it)")
        return value

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        expected = self._signed(key, expected) if expected else b""  # empty: the key must be absent
        self._store.compare_set(self._prefix + key, expected, self._signed(key, desired))
        return self.get(key)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        keys = [self._prefix + k for k in keys]
        self._store.wait(keys) if timeout is None else self._store.wait(keys, timeout)

    def check(self, keys: list[str]) -> bool:
        return self._store.check([self._prefix + k for k in keys])

    def add(self, key: str, amount: int) -> int:
        return self._store.add(self._prefix + key, amount)

    def delete_key(self, key: str) -> bool:
        return self._store.delete_key(self._prefix + key)

    def num_keys(self) -> int:
        return self._store.num_keys()

    def set_timeout(self, timeout: timedelta) -> None:
        self._store.set_timeout(timeout)


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host`:`port` only. TCPStore's own server binds every interface (::),
    whatever host it is given; it serves a socket we bound ourselves instead (`master_listen_fd`)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


def local_address(peer: str) -> str:
    """This host's address on the route to `peer` (a UDP connect sends nothing, it only routes)."""
    family, _, _, _, address = socket.getaddrinfo(peer, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        return sock.getsockname()[0]


def join_store(host: str, port: int, rank: int, world_size: int, name: str, secret: str,
               timeout: timedelta) -> tuple[dist.TCPStore, SignedStore]:
    """Host (rank 0) or join the group's store and admit the members: (raw store, signed view).

    Rank 0 writes a fresh nonce; every member answers HMAC(secret, nonce, rank); rank 0 checks all
    the answers, then signs a verdict that the members check in turn (so they also know that the
    root holds the secret; a member with a wrong secret still reads why it was refused). A missing
    or wrong answer fails every member's join with an error naming the rank, before any process
    group forms. The secret itself never crosses the store."""
    if rank == 0:
        sock = _listen(host, port)
        store = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False,
                              master_listen_fd=sock.fileno(), use_libuv=True)
        sock.detach()  # the store owns the descriptor now and closes it
    else:
        store = dist.TCPStore(host, port, None, False, timeout)
    signed = SignedStore(store, f"raygrpo-{name}", secret)
    hello = f"raygrpo-join-{name}/"  # outside the signed view: a member with a wrong secret reads the verdict too
    if rank == 0:
        nonce = secrets.token_hex(16)
        store.set(hello + "nonce", nonce)
        try:
            _check_proofs(store, name, nonce, world_size, secret, timeout)
        except (TimeoutError, PermissionError) as err:
            store.set(hello + "verdict", _verdict(secret, name, nonce, str(err)))  # the members fail at once too
            raise
        store.set(hello + "verdict", _verdict(secret, name, nonce, "admitted"))
        return store, signed
    try:
        store.wait([hello + "nonce"], timeout)
        nonce = store.get(hello + "nonce").decode()
        store.set(hello + f"proof/{rank}", _proof(secret, name, nonce, rank))
        store.wait([hello + "verdict"], timeout)
    except Exception as err:  # noqa: BLE001 - a store timeout: say who waited for what
        raise TimeoutError(f"weight group {name}: rank {rank} timed out joining ({err})") from err
    raw = store.get(hello + "verdict")
    text = raw[SignedStore.TAG:].decode(errors="replace")
    if not hmac.compare_digest(raw, _verdict(secret, name, nonce, text)):
        raise PermissionError(f"weight group {name}: rank {rank} refused: the root's verdict ({text[:300]}) is not "
                              "signed with this member's secret (a wrong secret, or a store not hosted by the root)")
    if text != "admitted":
        raise PermissionError(f"weight group {name}: rank {rank} not admitted: {text}")
    return store, signed


def _verdict(secret: str, name: str, nonce: str, text: str) -> bytes:
    """The root's signed answer to this join: "admitted" or why not."""
    return _mac(secret, "verdict", name, nonce, text) + text.encode()


def _proof(secret: str, name: str, nonce: str, rank: int) -> bytes:
    """Member `rank`'s answer to the root's nonce (hex)."""
    return _mac(secret, "proof", name, nonce, str(rank)).hex().encode()


def _check_proofs(store: dist.TCPStore, name: str, nonce: str, world_size: int, secret: str,
                  timeout: timedelta) -> None:
    """Rank 0: every member answered the nonce with the right proof within `timeout`, else raise
    (TimeoutError / PermissionError) naming the ranks."""
    keys = {r: f"raygrpo-join-{name}/proof/{r}" for r in range(1, world_size)}
    try:
        store.wait(list(keys.values()), timeout)
    except Exception as err:  # noqa: BLE001 - a store timeout: name the ranks that never answered
        missing = ", ".join(str(r) for r, key in keys.items() if not store.check([key]))
        raise TimeoutError(f"weight group {name}: timed out after {timeout.total_seconds():g} s waiting for "
                           f"rank(s) {missing} to join and prove the group's secret") from err
    for r, key in keys.items():
        if not hmac.compare_digest(store.get(key), _proof(secret, name, nonce, r)):
            raise PermissionError(f"weight group {name}: rank {r} gave a wrong proof of the group's secret: refused")
