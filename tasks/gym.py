"""reasoning-gym as a task: its procedural, verifiable datasets (no network), scored by its own
`score_answer` (the `reasoning_gym` reward, `actors.rewards.gym`).

Problems are drawn per step from `reasoning_gym.create_dataset(task.gym_dataset, seed=..., size=n)`
with a seed derived from (task.seed, step, round), so a run is repeatable batch for batch; the
held-out set is one dataset of `task.test_size` under a seed no training batch uses. Each problem
carries the dataset's entry in its metadata (JSON-safe), which is what `score_answer` needs.
Optional: `pip install reasoning-gym` (the `gym` extra).
"""

from __future__ import annotations

import json
from typing import Any

from common.errors import ConfigError
from tasks.base import Problem, stable_seed

INSTRUCTION = "Give your final answer alone on the last line."


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples to lists, anything odd to text


class GymTask:
    def __init__(self, dataset: str, seed: int = 0, test_size: int = 64, instruction: str = INSTRUCTION):
        try:
            import reasoning_gym
        except ImportError:
            raise ConfigError("task.name=reasoning_gym needs the reasoning-gym package: pip install -e '.[gym]'") from None
        try:
            reasoning_gym.create_dataset(dataset, size=1, seed=0)
        except Exception as err:  # noqa: BLE001 - an unknown name, bad settings
            raise ConfigError(f"task.gym_dataset={dataset!r}: reasoning-gym cannot make it ({err})") from None
        self.rg, self.dataset, self.seed = reasoning_gym, dataset, seed
        self.test_size, self.instruction = test_size, instruction

    def _problems(self, seed: int, n: int, prefix: str) -> list[Problem]:
        data = self.rg.create_dataset(self.dataset, size=n, seed=seed % 2**31)
        out = []
        for i in range(n):
            entry = _plain(data[i])
            prompt = entry["question"].rstrip() + ("\n" + self.instruction if self.instruction else "")
            out.append(Problem(id=f"{prefix}{i}", prompt=prompt, answer=str(entry["answer"]),
                               metadata={"gym_dataset": self.dataset, "gym_entry": entry},
                               source=f"reasoning-gym:{self.dataset}"))
        return out

    def train_batch(self, step: int, n: int, round: int = 0) -> list[Problem]:
        return self._problems(stable_seed("gym", self.seed, step, round), n, f"s{step}r{round}-")

    def test_set(self) -> list[Problem]:
        return self._problems(stable_seed("gym-test", self.seed), self.test_size, "test-") if self.test_size else []

    def max_steps(self, prompts_per_step: int) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {}
