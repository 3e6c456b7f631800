"""The task interface: where a run's prompts and reference answers come from.

A task hands the driver training problems by step and a fixed held-out set:
`tasks.arithmetic.ArithmeticTask` (a seeded generator, the default), `tasks.files.FileTask`
(the user's JSONL / JSON / Parquet / `save_to_disk` files), `tasks.word_problems.WordProblemTask` (generated
GSM8K-style problems), `tasks.gym.GymTask` (reasoning-gym) and `tasks.humaneval` (HumanEval rows for the file task). Each is a
deterministic function of its seed and the step, so a run can be repeated (and later resumed)
batch for batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, Union

from actors.types import Messages

PromptContent = Union[str, Messages]  # the user message, or chat messages used as is


@dataclass(frozen=True)
class Problem:
    """One problem: what the policy is asked, the reference answer, and the row's context."""

    id: str  # unique within one step's batch and within the held-out set
    prompt: PromptContent  # the user message, or a whole chat
    answer: str  # reference answer (as a string) for the reward functions
    metadata: dict[str, Any] = field(default_factory=dict)  # the row's other columns
    source: str = ""  # where it came from, e.g. "train.jsonl:12" (for sample tables)


class Task(Protocol):
    def train_batch(self, step: int, n: int, round: int = 0) -> list[Problem]:
        """`n` training problems for `step`; `round` > 0 draws further, different problems for the
        same step (dynamic sampling). Same arguments, same problems."""

    def test_set(self) -> list[Problem]:
        """The held-out problems (empty when the task has none)."""

    def max_steps(self, prompts_per_step: int) -> int | None:
        """Steps until the data is used up (e.g. `data.epochs`), or None for an endless task."""

    def stats(self) -> dict[str, float]:
        """Figures about the data, logged with the first step (`data/...`)."""


def stable_seed(*parts: object) -> int:
    """An integer seed derived from `parts`, identical across processes (unlike `hash`)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def prompt_text(prompt: PromptContent) -> str:
    """A one-string view of a prompt for tables and reports: the text, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]
