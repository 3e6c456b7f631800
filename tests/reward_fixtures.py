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
