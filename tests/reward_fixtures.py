"""User-defined reward functions for the scoring tests, loaded by import path.

They are referenced as ``"tests.reward_fixtures:<name>"`` so that the scorer's
child process imports them itself, like any user reward.
"""

import time


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
