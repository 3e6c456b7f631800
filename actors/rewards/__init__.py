"""Reward functions and their registry.

A reward function has the signature ``fn(completion: str, answer: str) -> float`` and may also
take the keyword arguments ``prompt`` (the prompt: a string, or chat messages), ``metadata``
(the data row's other columns) and ``info`` (the completion's trajectory counters,
``Completion.info``: turns, tool calls, ``turn_reward`` the sum of the environment's per-turn
rewards, ...; ``{}`` for a single reply): they are passed only to functions whose signature names
them (or takes ``**kwargs``).

A function marked with :func:`batched` scores a whole group at once — the shape a reward model
or an LLM judge needs: ``fn(completions: list[str], answer: str, ...) -> list[float]``.

Built-in rewards are looked up by name in :data:`REWARDS`; user-defined ones by import path,
either dotted ``package.module.function`` (it can be typed in a Hydra override) or
``package.module:function``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Callable

from common.registry import LazyRegistry

RewardFn = Callable[..., float]
CONTEXT = ("prompt", "metadata", "info")  # keyword arguments a reward function may ask for


# Imported on first use (common.registry): importing this registry imports no reward's dependencies.
REWARDS: Mapping[str, RewardFn] = LazyRegistry({
    "accuracy": "actors.rewards.math:accuracy",
    "accuracy_strict": "actors.rewards.math:accuracy_strict",
    "format": "actors.rewards.math:format_reward",
    "single_number": "actors.rewards.math:single_number",
    "digits": "actors.rewards.math:digits",
    "code_tests": "actors.rewards.code:code_tests",
    "think_format": "actors.rewards.reasoning:think_format",
    "language_consistency": "actors.rewards.reasoning:language_consistency",
    "reasoning_gym": "actors.rewards.gym:reasoning_gym",  # with task.name=reasoning_gym
    "env": "actors.rewards.env:env_reward",  # the environment's own reward (env.name=skyrl:<id>, ...)
})


# Built-ins that take settings (`reasoning.*`: think tags, target script; the code sandbox) are made by a factory.
FACTORIES: Mapping[str, Callable[..., RewardFn]] = LazyRegistry({
    "code_tests": "actors.rewards.code:make_code_tests",  # reward.code.sandbox
    "think_format": "actors.rewards.reasoning:make_think_format",
    "language_consistency": "actors.rewards.reasoning:make_language_consistency",
})


def batched(fn: Callable) -> Callable:
    """Mark `fn` as a group reward: `fn(completions, answer, [prompt], [metadata], [info]) -> list[float]`
    (`info`: one dict per completion)."""
    fn.batched = True
    return fn


def is_batched(fn: Callable) -> bool:
    return bool(getattr(fn, "batched", False))


def context_kwargs(fn: Callable) -> tuple[str, ...]:
    """Which of `prompt` / `metadata` / `info` the function takes (all with `**kwargs`)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the plain form
        return ()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return CONTEXT
    return tuple(k for k in CONTEXT if k in params)


class UnknownRewardError(ValueError, KeyError):
    """A reward name that is neither registered nor an importable function.

    It is both a ValueError and a KeyError, so callers may catch either.
    """

    def __str__(self) -> str:  # KeyError would otherwise show the repr
        return str(self.args[0]) if self.args else ""


def resolve(name: str, settings: dict | None = None) -> RewardFn:
    """The reward function for a registry name or an import path (``pkg.mod.fn`` or ``pkg.mod:fn``);
    ``settings`` configure a built-in made by a factory (:data:`FACTORIES`), e.g. its think tags.

    Raises:
        UnknownRewardError: the name is unknown, the module does not import,
            or the attribute is missing or not callable.
    """
    if settings and name in FACTORIES:
        try:
            return FACTORIES[name](**settings)
        except (TypeError, ValueError) as e:
            raise UnknownRewardError(f"reward {name!r} with settings {settings}: {e}") from e
    if name in REWARDS:
        return REWARDS[name]
    known = ", ".join(sorted(REWARDS))
    if ":" not in name and "." not in name:
        raise UnknownRewardError(
            f"unknown reward {name!r}; known rewards: {known} "
            "(or give an import path package.module.function)"
        )
    module_name, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # ImportError, AttributeError, or the module's own error
        raise UnknownRewardError(
            f"cannot load reward {name!r}: {type(e).__name__}: {e}; known rewards: {known}"
        ) from e
    if not callable(fn):
        raise UnknownRewardError(f"reward {name!r} is not callable; known rewards: {known}")
    return fn


__all__ = ["FACTORIES", "REWARDS", "RewardFn", "UnknownRewardError", "batched", "context_kwargs", "is_batched", "resolve"]
