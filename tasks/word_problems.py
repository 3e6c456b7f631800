"""GSM8K-style word problems, generated offline: real problems for skyrl-gym's gsm8k environments.

skyrl-gym ships the `gsm8k` environments but not GSM8K (SkyRL's recipe downloads it from the hub),
so this task writes its own: short stories of two or three steps of integer arithmetic (change
after shopping, packs bought and given away, pages left to read, cookies shared, distance at two
speeds, savings spent), their answers computed with the story. No network, and repeatable batch
for batch: a step's problems come from a seed of (task.seed, step, round), the held-out set from
its own seed, and no training problem repeats a held-out one (their texts are compared).

The instruction asks for the final answer as "#### <number>", the format gsm8k's strict parser
reads. Each problem's metadata is its row as a SkyRL dataset holds it (`data_source`,
`reward_spec` with the ground truth, `extra_info`), which `envs.skyrl` hands the environment.
"""

from __future__ import annotations

import random
from typing import Callable

from tasks.base import Problem, stable_seed

INSTRUCTION = "Think step by step, then give the final answer on its own line as '#### <number>'."
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun")
THINGS = ("pencils", "marbles", "stickers", "apples", "cards", "shells")


def _shopping(r: random.Random) -> tuple[str, int]:
    name, n, price = r.choice(NAMES), r.randint(2, 9), r.randint(2, 12)
    bill = next(b for b in (20, 50, 100, 200) if b > n * price)
    item = r.choice(("notebooks", "pens", "mugs", "tickets"))
    return (f"{name} buys {n} {item} at ${price} each and pays with a ${bill} bill. "
            f"How many dollars of change does {name} get?"), bill - n * price


def _packs(r: random.Random) -> tuple[str, int]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    have, packs, each = r.randint(3, 30), r.randint(2, 6), r.randint(3, 12)
    given = r.randint(1, have)
    return (f"{name} has {have} {thing}. {name} buys {packs} packs of {each} {thing} each, then gives "
            f"{given} {thing} to a friend. How many {thing} does {name} have now?"), have + packs * each - given


def _pages(r: random.Random) -> tuple[str, int]:
    name, per_day, days = r.choice(NAMES), r.randint(5, 30), r.randint(2, 9)
    total = per_day * days + r.randint(1, 150)
    return (f"A book has {total} pages. {name} reads {per_day} pages a day for {days} days. "
            "How many pages are left to read?"), total - per_day * days


def _cookies(r: random.Random) -> tuple[str, int]:
    name, friends, share, trays = r.choice(NAMES), r.randint(2, 6), r.randint(2, 5), r.randint(2, 6)
    return (f"{name} bakes {trays} trays of {friends * share} cookies each and shares all of them equally "
            f"among {friends} friends. How many cookies does each friend get?"), trays * share


def _trip(r: random.Random) -> tuple[str, int]:
    s1, h1, s2, h2 = r.randint(3, 12) * 10, r.randint(1, 4), r.randint(3, 12) * 10, r.randint(1, 4)
    return (f"A train travels at {s1} km per hour for {h1} hours, then at {s2} km per hour for {h2} hours. "
            "How many kilometres does it travel in total?"), s1 * h1 + s2 * h2


def _savings(r: random.Random) -> tuple[str, int]:
    name, weekly, weeks = r.choice(NAMES), r.randint(3, 25), r.randint(3, 12)
    spent = r.randint(1, weekly * weeks)
    return (f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a gift. "
            f"How many dollars does {name} have left?"), weekly * weeks - spent


TEMPLATES: tuple[Callable[[random.Random], tuple[str, int]], ...] = (
    _shopping, _packs, _pages, _cookies, _trip, _savings)


class WordProblemTask:
    def __init__(self, seed: int = 0, test_size: int = 64, instruction: str = INSTRUCTION):
        self.seed, self.instruction = seed, instruction
        self.test = self._draw(stable_seed("word-problems-test", seed), test_size, "test-", frozenset())
        self.held_out = frozenset(p.prompt for p in self.test)

    def _draw(self, seed: int, n: int, prefix: str, avoid: frozenset) -> list[Problem]:
        """`n` distinct problems from `seed`, none of whose texts is in `avoid`."""
        rng, out, seen = random.Random(seed), [], set(avoid)
        while len(out) < n:
            template = rng.choice(TEMPLATES)
            question, answer = template(rng)
            prompt = f"{question}\n{self.instruction}" if self.instruction else question
            if prompt in seen:
                continue
            seen.add(prompt)
            kind = template.__name__.lstrip("_")
            row = {"data_source": "raygrpo/word_problems", "extra_info": {"template": kind},
                   "reward_spec": {"method": "rule", "ground_truth": str(answer)}}
            out.append(Problem(id=f"{prefix}{len(out)}", prompt=prompt, answer=str(answer), metadata=row,
                               source=f"word_problems:{kind}"))
        return out

    def train_batch(self, step: int, n: int, round: int = 0) -> list[Problem]:
        return self._draw(stable_seed("word-problems", self.seed, step, round), n, f"s{step}r{round}-", self.held_out)

    def test_set(self) -> list[Problem]:
        return list(self.test)

    def max_steps(self, prompts_per_step: int) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {}
