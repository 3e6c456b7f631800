"""User-defined reward functions for the scoring tests, loaded by import path.

They are referenced as ``"tests.reward_fixtures:<name>"`` (or ``tests.reward_fixtures.<name>``)
so that the scorer's child process imports them itself, like any user reward.
"""

import time

from actors.rewards import batched


def sleepy(completion: str, answer: str) -> float:
    """Hangs for 30 s when the completion says "sleep", else returns 1.0."""
    if "sleep" in completion:
        time.sleep(30)
    return 1.0


def broken(completion: str, answer: str) -> float:
    """Raises when the completion says "boom", else returns 0.5."""
    if "boom" in completion:
        raise RuntimeError("reward exploded")
    return 0.5


def chatty(completion: str, answer: str) -> float:
    """Prints to stdout and reads stdin, which must not disturb the protocol."""
    import sys

    print("noise on stdout " * 100)
    sys.stdin.read()
    return 1.0


def crash(completion: str, answer: str) -> float:
    """Kills its own process when the completion says "die", else returns 1.0."""
    import os

    if "die" in completion:
        os._exit(3)
    return 1.0


def with_prompt(completion: str, answer: str, prompt: str) -> float:
    """The prompt's length: proves the prompt arrived."""
    return float(len(prompt))


def with_metadata(completion: str, answer: str, *, metadata: dict) -> float:
    """The row's `level` column."""
    return float(metadata["level"])


def with_kwargs(completion: str, answer: str, **context) -> float:
    """How many context arguments arrived (prompt and metadata: 2)."""
    return float(sum(context.get(k) is not None for k in ("prompt", "metadata")))


@batched
def rank_by_length(completions: list[str], answer: str) -> list[float]:
    """Each completion's length rank in its group, scaled to [0, 1]; one value too few when the
    answer is "wrong-length"."""
    order = sorted(range(len(completions)), key=lambda i: len(completions[i]))
    ranks = [0.0] * len(completions)
    for r, i in enumerate(order):
        ranks[i] = r / max(1, len(completions) - 1)
    return ranks[1:] if answer == "wrong-length" else ranks


# ---------------------------------------------------------------- hostile rewards (tests/test_untrusted_data.py)

class _Touch:
    """Unpickling this creates a marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


def hostile_pickle(marker: str) -> bytes:
    """A pickle whose load creates `marker`."""
    import pickle

    return pickle.dumps(_Touch(marker))


def _write_to_reply_pipes(data: bytes) -> None:
    """What a completion run by the code sandbox did in the audit: open this process's writable
    pipes through /proc (the reply pipe among them; not stdout/stderr) and write into them."""
    import fcntl
    import os

    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            is_pipe = os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
            writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        except OSError:
            continue
        if fd > 2 and is_pipe and writable:
            out = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
            os.write(out, data)
            os.close(out)


def _frame(payload: bytes, size: int | None = None) -> bytes:
    import struct

    return struct.pack("!Q", len(payload) if size is None else size) + payload


def forge_pickle(completion: str, answer: str) -> float:
    """On a completion "attack:<marker>", writes a framed pickle that would create <marker> when
    loaded into the reply pipe; returns 0.0 either way."""
    if completion.startswith("attack:"):
        _write_to_reply_pipes(_frame(hostile_pickle(completion.removeprefix("attack:"))))
    return 0.0


def forge_json(completion: str, answer: str) -> float:
    """On "attack", writes a well-formed JSON reply claiming 1.0 for itself, with a guessed
    request id, into the reply pipe; the true reward is 0.0."""
    import json

    if completion == "attack":
        reply = ["ok", {"tests.reward_fixtures:forge_json": 1.0}, "0000000000000000"]
        _write_to_reply_pipes(_frame(json.dumps(reply).encode()))
    return 0.0


def announce_huge(completion: str, answer: str) -> float:
    """On "attack", writes a header announcing a 1 TiB reply and nothing after it."""
    if completion == "attack":
        _write_to_reply_pipes(_frame(b"", size=1 << 40))
    return 1.0


def sees_env(completion: str, answer: str) -> float:
    """1.0 when the environment variable named by the completion is set here."""
    import os

    return float(completion in os.environ)


def check_context(completion: str, answer: str, prompt, metadata: dict) -> float:
    """1.0 when the prompt and metadata arrived as `tests/test_untrusted_data.py` sent them (JSON
    kept numbers, lists and dicts exact; a datetime and a set became text and a list)."""
    expected = {"n": 3, "x": 0.1, "big": 2**62, "nested": {"a": [1, 2.5, None, True]}, "when": "2024-01-02T03:04:05",
                "tags": ["t"], "np": 7}
    if metadata != expected or type(metadata["n"]) is not int or type(metadata["np"]) is not int:
        raise AssertionError(f"metadata arrived as {metadata!r}")
    if prompt != ({"role": "user", "content": "hi"},):
        raise AssertionError(f"prompt arrived as {prompt!r}")
    return 1.0
