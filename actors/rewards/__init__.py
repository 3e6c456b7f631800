"""Reward functions and their registry.

A reward function has the signature ``fn(completion: str, answer: str) -> float``.
Built-in rewards are looked up by name in :data:`REWARDS`; user-defined ones
are given as an import path ``"package.module:function"``.
"""

from __future__ import annotations

import importlib
from typing import Callable

from actors.rewards.math import accuracy, accuracy_strict, digits, format_reward, single_number

RewardFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "accuracy_strict": accuracy_strict,
    "format": format_reward,
    "single_number": single_number,
    "digits": digits,
}


class UnknownRewardError(ValueError, KeyError):
    """A reward name that is neither registered nor an importable function.

    It is both a ValueError and a KeyError, so callers may catch either.
    """

    def __str__(self) -> str:  # KeyError would otherwise show the repr
        return str(self.args[0]) if self.args else ""


def resolve(name: str) -> RewardFn:
    """The reward function for a registry name or a ``"module:function"`` path.

    Raises:
        UnknownRewardError: the name is unknown, the module does not import,
            or the attribute is missing or not callable.
    """
    if name in REWARDS:
        return REWARDS[name]
    known = ", ".join(sorted(REWARDS))
    if ":" not in name:
        raise UnknownRewardError(
            f"unknown reward {name!r}; known rewards: {known} "
            "(or give an import path 'package.module:function')"
        )
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # ImportError, AttributeError, or the module's own error
        raise UnknownRewardError(
            f"cannot load reward {name!r}: {type(e).__name__}: {e}; known rewards: {known}"
        ) from e
    if not callable(fn):
        raise UnknownRewardError(f"reward {name!r} is not callable; known rewards: {known}")
    return fn


def is_known(name: str) -> bool:
    """True for a registry name or an import path that resolves to a callable."""
    try:
        resolve(name)
    except UnknownRewardError:
        return False
    return True


__all__ = ["REWARDS", "RewardFn", "UnknownRewardError", "is_known", "resolve"]
