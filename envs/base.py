"""Environments: a rollout as a trajectory of turns (policy reply, environment observation, ...).

An `Environment` opens a trajectory from the prompt's chat (`reset`) and answers each assistant
reply with observation messages, or ends it (`step`). The engine actor drives every trajectory of
a batch independently (`actors.multiturn`): while one waits for its environment, the engine keeps
decoding the others. The reward is the reward functions', computed once at the end on the final
reply; per-turn rewards an environment reports are summed in the trajectory's `info`
(`turn_reward`), which the `env` reward (`actors.rewards.env`) scores as the trajectory's reward.

An environment that judges replies itself (skyrl-gym's, `envs.skyrl`) needs the problem's answer:
its `reset` names a `problem` parameter and gets the `actors.types.Prompt` (its `answer` and
`metadata`, the task's reference answer and row); a `reset(messages)` without it is called as
before (`open_trajectory`). An optional `close(state)` releases a trajectory's resources once it
has ended, however it ended (`close_trajectory`).

Choices (those of SkyRL and verl's agent loop):
- the policy's tokens are kept exactly as sampled; observations are encoded once, as the chat
  template's delta (`envs.tokens`), never by re-tokenizing the conversation;
- the learner's sequence is the concatenation; its loss mask covers the policy's tokens only;
- limits: `max_turns` replies, `max_turn_tokens` per reply, `max_total_tokens` for everything
  after the prompt (observations included); a trajectory cut by one is kept, its reason counted.
Plain data only here: no vLLM, no Ray, no torch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, str]


@dataclass
class StepResult:
    """What an environment answers to one assistant reply."""

    messages: list[Message]  # observations to append (role "tool" or "user"); empty when done
    done: bool
    info: dict[str, float] = field(default_factory=dict)  # counters for the step's metrics (summed)
    reward: float | None = None  # an optional per-turn reward, kept in the trajectory


class Environment(Protocol):
    max_turns: int

    def reset(self, messages: list[Message], problem: Any = None) -> tuple[list[Message], Any]:
        """The chat the policy sees first (the prompt's, perhaps with instructions added) and the
        trajectory's own state. `problem` (optional: only a reset that names it gets it) is the
        `actors.types.Prompt` being answered, with its reference answer and row (`.answer`, `.metadata`)."""

    def step(self, state: Any, reply: str) -> StepResult:
        """Answer the policy's reply `reply` (its text, special tokens removed). Runs in a worker
        thread beside the engine: it may block (a tool call), never for longer than its own limits."""

    def tools(self) -> list[dict] | None:
        """JSON schemas of the tools, rendered by the chat template (None: no tools)."""


def open_trajectory(env: Environment, prompt: Any) -> tuple[list[Message], Any]:
    """`env.reset` on the chat of `prompt` (an `actors.types.Prompt`), with `problem=prompt` when
    the reset takes it (it names `problem` or takes **kwargs): environments written for
    `reset(messages)` keep working."""
    try:
        params = inspect.signature(env.reset).parameters
    except (TypeError, ValueError):  # no signature to read: the plain form
        params = {}
    wants = "problem" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return env.reset(prompt.messages(), problem=prompt) if wants else env.reset(prompt.messages())


def close_trajectory(env: Environment, state: Any) -> None:
    """The environment's optional `close(state)` for a trajectory that has ended. Its errors are
    dropped: the trajectory is over and kept as it is."""
    close = getattr(env, "close", None)
    if close is not None:
        try:
            close(state)
        except Exception:  # noqa: BLE001 - an environment's cleanup must not cost the batch
            pass


class SingleTurn:
    """Today's rollout: one reply, no observation. Trajectories of one turn equal plain completions."""

    max_turns = 1

    def reset(self, messages: list[Message]) -> tuple[list[Message], None]:
        return messages, None

    def step(self, state: None, reply: str) -> StepResult:
        return StepResult(messages=[], done=True)

    def tools(self) -> None:
        return None
