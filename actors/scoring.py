"""Scoring completions with weighted reward functions and real per-sample deadlines.

:class:`Scorer` runs the reward functions in a child process
(``python -m actors.reward_server``, see that module for the protocol) and
waits for each reply with ``select`` and a deadline.  A sample that
overruns gets the child killed and replaced, so a hung reward (a pathological
sympy simplification, say) costs one sample, never the run.  Because the
functions run in the child's main thread, this also works when ``score`` is
called from a non-main thread, such as inside a Ray actor.

Replies are JSON, and each is checked strictly against its request before it is believed
(:func:`check_reply`): the child runs code written by the policy (the code reward), which may
write into the reply pipe.  A reply that is too long, not JSON, not an answer to this request or
not of the expected shape fails its sample ("malformed reply from reward server") and the child
is replaced.  The child starts from an allowlisted environment (:func:`reward_env`), so reward
functions and the code they run never see the run's credentials unless a user names them
(``pass_env``).

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
import secrets
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from actors.reward_server import HEADER, ProtocolError, message_size, pack, unpack
from actors.rewards import is_batched, resolve
from actors.types import ScoreRequest

# The directory that holds the ``actors`` package; the child needs it importable.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0  # for the child's imports; not counted against samples
MAX_ERROR_CHARS = 2000  # of a reward's error text kept in a Score (it reaches logs and sample tables)

# What the reward server inherits: what Python, numeric libraries and Hugging Face caches need.
ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "TERM",
    "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING", "PYTHONUTF8", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMEXPR_MAX_THREADS",
    "VECLIB_MAXIMUM_THREADS", "RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES",
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_CACHE",
    "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME",
})
ENV_PREFIXES = ("LC_", "RAYGRPO_")  # locale settings, and our own (less those that look like secrets)
SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE")


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


def reward_env(pass_env: tuple[str, ...] = (), environ: dict[str, str] | None = None) -> dict[str, str]:
    """The reward server's environment: from ``environ`` (default ``os.environ``) only the names in
    ``ENV_NAMES``, those under ``ENV_PREFIXES`` that do not look like secrets, and every name in
    ``pass_env``; ``PYTHONPATH`` with the project root first.  Whatever else the parent holds
    (W&B, Ray, cloud and Hugging Face tokens) stays out of reach of reward functions."""
    environ = os.environ if environ is None else environ

    def allowed(name: str) -> bool:
        if name in ENV_NAMES or name in pass_env:
            return True
        return name.startswith(ENV_PREFIXES) and not any(m in name.upper() for m in SECRET_MARKERS)

    env = {k: v for k, v in environ.items() if allowed(k)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), environ.get("PYTHONPATH")) if p)
    return env


def check_reply(reply: object, request_id: str, names: frozenset[str], group_size: int | None) -> tuple[str, object]:
    """A decoded reply as ``("ok", parts)`` or ``("error", text)``, checked strictly against its
    request: it echoes ``request_id``, its status is "ok" or "error", an error is a string, and
    the parts are ``{name: float}`` for exactly ``names`` (for a group, a list of ``group_size``
    of them; ``group_size`` None: one sample).  ProtocolError for anything else."""
    if not (isinstance(reply, list) and len(reply) == 3 and reply[2] == request_id):
        raise ProtocolError("not a reply to this request")
    status, payload, _ = reply
    if status == "error":
        if not isinstance(payload, str):
            raise ProtocolError("an error reply without a message")
        return status, payload[:MAX_ERROR_CHARS]
    if status != "ok":
        raise ProtocolError(f"unknown status {str(status)[:40]!r}")
    if group_size is None:
        return status, _checked_parts(payload, names)
    if not (isinstance(payload, list) and len(payload) == group_size):
        raise ProtocolError(f"not a list of {group_size} samples' rewards")
    return status, [_checked_parts(p, names) for p in payload]


def _checked_parts(parts: object, names: frozenset[str]) -> dict[str, float]:
    """``parts`` when it is ``{name: float}`` for exactly ``names`` (no bools, ints, strings)."""
    if not (isinstance(parts, dict) and parts.keys() == names and all(type(v) is float for v in parts.values())):
        raise ProtocolError("rewards are not {name: float} for exactly the functions scored")
    return parts


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
        pass_env: Names of environment variables the reward functions may see
            beyond the allowlist of :func:`reward_env` (e.g. ``OPENAI_API_KEY``
            for an LLM judge).

    Raises:
        ValueError: no functions, an unknown function name (the message lists
            the known names), a non-positive timeout, or a ``pass_env`` entry
            that is not a variable name.

    Use as a context manager, or call :meth:`close`, to stop the child.
    ``score`` is serialized by a lock, so a Scorer may be shared by threads.
    """

    def __init__(self, functions: dict[str, float], timeout_s: float = 5.0,
                 settings: dict[str, dict] | None = None, pass_env: tuple[str, ...] = ()) -> None:
        self._proc: subprocess.Popen | None = None
        if not functions:
            raise ValueError("Scorer needs at least one reward function")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        bad = [n for n in pass_env if not (isinstance(n, str) and n and "=" not in n and "\0" not in n)]
        if bad:
            raise ValueError(f"pass_env holds names that are not environment variable names: {bad}")
        self.pass_env = tuple(pass_env)
        self.settings = {name: dict(v) for name, v in (settings or {}).items() if name in functions}
        batched = {name for name in functions if is_batched(resolve(name, self.settings.get(name)))}  # lists known names
        self.functions = {name: float(weight) for name, weight in functions.items()}
        self.timeout_s = float(timeout_s)
        self._group_names = frozenset(batched)
        self._sample_names = frozenset(functions) - self._group_names
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
        infos = r.infos or [{} for _ in r.completions]  # `info` of each completion: {} for single replies
        replies = [self._request("sample", c, (*context, info), self.timeout_s) if self._sample_names else ("ok", {})
                   for c, info in zip(r.completions, infos)]
        if self._group_names and r.completions:
            status, payload = self._request("group", r.completions, (*context, infos),
                                            self.timeout_s * len(r.completions))
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

    def _request(self, kind: str, first: str | list[str], context: tuple, timeout_s: float) -> tuple[str, object]:
        """The child's checked reply to one "sample" or "group" request, or ("error", why) after
        replacing a child that hung, died or broke the protocol."""
        if self._proc is None:
            self._start()
        request_id = secrets.token_hex(8)  # a forged reply must guess it
        group = kind == "group"
        try:
            message = pack([kind, request_id, first, *context])
        except ProtocolError as e:
            return "error", f"request not sent to the reward server: {e}"
        try:
            self._send(message)
            reply = self._receive(timeout_s)
            return check_reply(reply, request_id, self._group_names if group else self._sample_names,
                               len(first) if group else None)
        except TimeoutError:
            self._stop()
            return "error", f"timeout after {timeout_s:g} s"
        except _ChildDied:
            code = self._stop(grace_s=1.0)
            return "error", f"reward server died (exit code {code})"
        except ProtocolError as e:  # whatever wrote it may write again: a fresh child serves the next sample
            self._stop()
            return "error", f"malformed reply from reward server ({e}); the server was replaced"

    def _start(self) -> None:
        """Start a child and wait until it has resolved the functions."""
        env = reward_env(self.pass_env)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "actors.reward_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self._send(pack([[name, self.settings.get(name)] for name in self.functions]))
            reply = self._receive(STARTUP_TIMEOUT_S)
        except (TimeoutError, _ChildDied, ProtocolError) as e:
            reply = ["error", repr(e)]
        if reply != ["ready", None]:
            self._stop()
            error = reply[1] if isinstance(reply, list) and len(reply) == 2 and reply[0] == "error" else reply
            raise RuntimeError(f"reward server failed to start: {str(error)[:MAX_ERROR_CHARS]}")

    def _send(self, data: bytes) -> None:
        """Write one framed message to the child's stdin; _ChildDied when it is gone."""
        try:
            while data:
                data = data[os.write(self._proc.stdin.fileno(), data) :]
        except OSError as e:  # BrokenPipeError: the child is gone
            raise _ChildDied(str(e)) from e

    def _receive(self, timeout_s: float) -> object:
        """The child's next message, decoded (not yet checked), waiting at most ``timeout_s`` in
        total; ProtocolError when it announces more than the cap or is not JSON."""
        deadline = time.monotonic() + timeout_s
        size = message_size(self._read_exact(HEADER.size, deadline))
        return unpack(self._read_exact(size, deadline))

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
