"""The `reasoning_gym` reward: reasoning-gym's own `score_answer` for the problem's dataset entry
(`tasks.gym`), on the reply's answer: the text inside <answer>...</answer> when there is one, else
its last non-empty line."""

from __future__ import annotations

import re

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract(completion: str) -> str:
    tagged = ANSWER.findall(completion)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def reasoning_gym(completion: str, answer: str, *, metadata: dict) -> float:
    """reasoning-gym's score in [0, 1] of the reply's answer for `metadata["gym_entry"]`."""
    from reasoning_gym import get_score_answer_fn

    score = get_score_answer_fn(metadata["gym_dataset"])
    return float(score(answer=extract(completion), entry=metadata["gym_entry"]))
