"""Scoring completions with weighted reward functions and real per-sample deadlines.

:class:`Scorer` runs the reward functions in a child process
(``python -m actors.reward_server``, see that module for the protocol) and
waits for each reply with ``select`` and a deadline.  A sample that
overruns gets the child killed and replaced, so a hung reward (a pathological
sympy simplification, say) costs one sample, never the run.  Because the
functions run in the child's main thread, this also works when ``score`` is
called from a non-main thread, such as inside a Ray actor.

Per-sample functions get one request (and one ``timeout_s``) per completion; batched functions
(:func:`actors.rewards.batched`) one request per group with ``timeout_s`` per completion in it,
and an error or timeout there fails the whole group.

A sample that could not be scored has ``status == "failed"`` and reward 0.0;
callers should keep it apart from a genuine reward of 0.  POSIX only
(``select`` on pipes).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from actors.reward_server import HEADER, pack
from actors.rewards import is_batched, resolve
from actors.types import ScoreRequest

# The directory that holds the ``actors`` package; the child needs it importable.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0  # for the child's imports; not counted against samples


@dataclass
class Score:
    """The result for one sample.

    ``parts`` maps each reward function name to its unweighted value and
    ``reward`` is their weighted sum.  When ``status`` is ``"failed"``,
    ``reward`` is 0.0, ``parts`` is empty and ``error`` says why.
    """

    reward: float
    parts: dict[str, float]
    status: str  # "ok" | "failed"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _failed(error: str) -> Score:
    return Score(reward=0.0, parts={}, status="failed", error=error)


def _die_with_parent() -> None:
    """Linux: the child is killed when its parent dies (a SIGKILLed reward actor leaves no orphan)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class _ChildDied(Exception):
    """The reward server closed its pipe (it exited or crashed)."""


class Scorer:
    """Weighted reward scoring in a killable child process.

    Args:
        functions: Weight per reward function name; names are registry names
            or import paths (see :mod:`actors.rewards`).
        timeout_s: Deadline for scoring one sample with all its per-sample
            functions (a batched function gets it once per sample of its group).
        settings: Settings of built-ins made by a factory, by name (e.g.
            ``{"think_format": {"open": "<think>", "close": "</think>"}}``);
            names not scored here are ignored.

    Raises:
        ValueError: no functions, an unknown function name (the message lists
            the known names), or a non-positive timeout.

    Use as a context manager, or call :meth:`close`, to stop the child.
    ``score`` is serialized by a lock, so a Scorer may be shared by threads.
    """

    def __init__(self, functions: dict[str, float], timeout_s: float = 5.0,
                 settings: dict[str, dict] | None = None) -> None:
        self._proc: subprocess.Popen | None = None
        if not functions:
            raise ValueError("Scorer needs at least one reward function")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.settings = {name: dict(v) for name, v in (settings or {}).items() if name in functions}
        batched = {name for name in functions if is_batched(resolve(name, self.settings.get(name)))}  # lists known names
        self.functions = {name: float(weight) for name, weight in functions.items()}
        self.timeout_s = float(timeout_s)
        self._per_sample = len(batched) < len(functions)
        self._batched = bool(batched)
        self._lock = threading.Lock()

    def score(self, requests: list[ScoreRequest]) -> list[list[Score]]:
        """One :class:`Score` per completion of each request, in order.

        Raises:
            RuntimeError: the child process could not be started.
        """
        with self._lock:
            return [self._score_group(r) for r in requests]

    def close(self) -> None:
        """Stop the child process (a later ``score`` starts a new one)."""
        self._stop(grace_s=1.0)

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop()

    def _score_group(self, r: ScoreRequest) -> list[Score]:
        context = (r.answer, r.prompt, r.metadata)
        replies = [self._request(("sample", c, *context), self.timeout_s) if self._per_sample else ("ok", {})
                   for c in r.completions]
        if self._batched and r.completions:
            status, payload = self._request(("group", r.completions, *context), self.timeout_s * len(r.completions))
            if status != "ok":
                replies = [(status, payload)] * len(replies)
            else:
                replies = [(s, {**p, **extra} if s == "ok" else p) for (s, p), extra in zip(replies, payload)]
        return [self._to_score(*reply) for reply in replies]

    def _to_score(self, status: str, payload: object) -> Score:
        if status != "ok":
            return _failed(payload)
        reward = sum(weight * payload[name] for name, weight in self.functions.items())
        return Score(reward=reward, parts=payload, status="ok")

    def _request(self, message: tuple, timeout_s: float) -> tuple[str, object]:
        """The child's reply, or ("error", why) after replacing a child that hung or died."""
        if self._proc is None:
            self._start()
        try:
            self._send(message)
            return self._receive(timeout_s)
        except TimeoutError:
            self._stop()
            return "error", f"timeout after {timeout_s:g} s"
        except _ChildDied:
            code = self._stop(grace_s=1.0)
            return "error", f"reward server died (exit code {code})"

    def _start(self) -> None:
        """Start a child and wait until it has resolved the functions."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "actors.reward_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self._send([(name, self.settings.get(name)) for name in self.functions])
            status, payload = self._receive(STARTUP_TIMEOUT_S)
        except (TimeoutError, _ChildDied) as e:
            status, payload = "error", repr(e)
        if status != "ready":
            self._stop()
            raise RuntimeError(f"reward server failed to start: {payload}")

    def _send(self, message: object) -> None:
        data = pack(message)
        try:
            while data:
                data = data[os.write(self._proc.stdin.fileno(), data) :]
        except OSError as e:  # BrokenPipeError: the child is gone
            raise _ChildDied(str(e)) from e

    def _receive(self, timeout_s: float) -> tuple[str, object]:
        """The child's next reply, waiting at most ``timeout_s`` in total."""
        deadline = time.monotonic() + timeout_s
        (size,) = HEADER.unpack(self._read_exact(HEADER.size, deadline))
        return pickle.loads(self._read_exact(size, deadline))

    def _read_exact(self, n: int, deadline: float) -> bytes:
        """``n`` bytes from the child's stdout, or TimeoutError / _ChildDied."""
        fd = self._proc.stdout.fileno()
        chunks, missing = [], n
        while missing:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, missing)
            if not chunk:
                raise _ChildDied("end of stream")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def _stop(self, grace_s: float = 0.0) -> int | None:
        """End the child (after ``grace_s`` to exit on its own); its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # EOF: a healthy child exits by itself
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        proc.stdout.close()
        return code
