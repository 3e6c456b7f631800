"""Procedurally generated integer arithmetic problems.

An :class:`ArithmeticTask` draws expressions such as ``12 + 7`` or ``3 * 4 - 5``
from a seeded generator and turns them into :class:`Problem` records (a user
prompt plus the integer answer as a string).

Splits are disjoint by construction: the test set is a fixed list of distinct
expressions drawn from its own seeded stream, and every training draw that
lands on a test expression is thrown away and drawn again.  All randomness
comes from ``random.Random`` instances seeded with integers derived from
SHA-256 digests, so results never depend on Python's salted ``hash``.

Expressions are evaluated without ``eval`` and with the usual precedence:
``*`` binds tighter than ``+`` and ``-``, which are applied left to right,
exactly as a reader (or Python) would evaluate the printed expression.

Answer format, and why: the prompt asks for "just the number" and the accuracy reward reads the
reply's final answer leniently (after ``####``, else in ``\boxed{}``, else its last number).
At 135M parameters a strict ``#### <n>`` or R1-style ``<think>…</think>`` format is out of
reach at first (measured on SmolLM2-135M-Instruct: 11% of replies used ``####`` and none of 192
was right), so every group had zero reward variance and nothing could be learned. With the
lenient reading the base model is right on ~30% of held-out two-operand problems up to 20, most
groups have reward variance from the first step, and accuracy rises with training (see README).
A format term is left to the reward config: a small "exactly one number" bonus was climbed with
"The answer is N" replies while accuracy fell, so the demo uses accuracy alone.
"""

from __future__ import annotations

import random

from tasks.base import Problem, stable_seed

_VALID_OPS = "+-*"
_MAX_DRAWS_PER_PROBLEM = 10_000  # safety net for the rejection samplers


def evaluate(operands: list[int], ops: list[str]) -> int:
    """Evaluate ``operands[0] ops[0] operands[1] ...`` with ``*`` before ``+``/``-``."""
    terms, signs = [operands[0]], [1]
    for op, value in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(sign * term for sign, term in zip(signs, terms))


class ArithmeticTask:
    """Integer arithmetic problems with deterministic, disjoint train/test splits.

    Args:
        seed: Seed for every draw; the same seed gives the same test set and
            the same training batches.
        min_operand: Smallest operand (inclusive, >= 0).
        max_operand: Largest operand (inclusive, >= ``min_operand``).
        num_operands: Operands per expression, 2 to 4.
        ops: Operators to draw from, a non-empty subset of ``"+-*"``.
            Answers may be negative when ``"-"`` is enabled.
        test_size: Number of distinct held-out test problems.  It may be at
            most half the number of possible expressions, so that plenty are
            left for training.
        instruction: Text appended to every prompt, which reads
            ``"What is 12 + 7? Answer with just the number."`` by default.
            An empty instruction leaves just the question.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        min_operand: int = 1,
        max_operand: int = 20,
        num_operands: int = 2,
        ops: str = "+-",
        test_size: int = 128,
        instruction: str = "Answer with just the number.",
    ) -> None:
        if min_operand < 0 or max_operand < min_operand:
            raise ValueError(
                f"need 0 <= min_operand <= max_operand, got {min_operand=}, {max_operand=}"
            )
        if not 2 <= num_operands <= 4:
            raise ValueError(f"num_operands must be between 2 and 4, got {num_operands}")
        if not ops or set(ops) - set(_VALID_OPS):
            raise ValueError(f"ops must be a non-empty subset of {_VALID_OPS!r}, got {ops!r}")
        space = (max_operand - min_operand + 1) ** num_operands * len(set(ops)) ** (
            num_operands - 1
        )
        if not 0 <= test_size <= space // 2:
            raise ValueError(
                f"test_size must be between 0 and {space // 2} (half of the {space} "
                f"possible expressions), got {test_size}"
            )
        self.seed = seed
        self.min_operand = min_operand
        self.max_operand = max_operand
        self.num_operands = num_operands
        self.ops = "".join(sorted(set(ops), key=_VALID_OPS.index))
        self.test_size = test_size
        self.instruction = instruction
        self._test = self._make_test_set()
        self._test_prompts = frozenset(p.prompt for p in self._test)

    def test_set(self) -> list[Problem]:
        """The ``test_size`` held-out problems (always the same list for a seed)."""
        return list(self._test)

    def train_batch(self, step: int, n: int, round: int = 0) -> list[Problem]:
        """``n`` training problems for ``step``, never one from the test set. ``round`` > 0 draws
        further, different problems for the same step (DAPO's dynamic sampling)."""
        if step < 0 or n < 0 or round < 0:
            raise ValueError(f"step, n and round must be >= 0, got {step=}, {n=}, {round=}")
        rng = random.Random(stable_seed("train", self.seed, step, *((round,) if round else ())))
        prefix = f"train/{step}" + (f".{round}" if round else "")
        batch = []
        for i in range(n):
            for _ in range(_MAX_DRAWS_PER_PROBLEM):
                problem = self._draw(rng, f"{prefix}/{i}")
                if problem.prompt not in self._test_prompts:
                    break
            else:  # unreachable while test_size <= half of the expression space
                raise RuntimeError("could not draw a training problem outside the test set")
            batch.append(problem)
        return batch

    def max_steps(self, prompts_per_step: int) -> None:
        """Endless: every step draws new problems."""
        return None

    def stats(self) -> dict[str, float]:
        return {}

    def _make_test_set(self) -> list[Problem]:
        """Draw ``test_size`` distinct problems from the test stream."""
        rng = random.Random(stable_seed("test", self.seed))
        problems: list[Problem] = []
        seen: set[str] = set()
        for _ in range(self.test_size * _MAX_DRAWS_PER_PROBLEM):
            if len(problems) == self.test_size:
                break
            problem = self._draw(rng, f"test/{len(problems)}")
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                problems.append(problem)
        return problems

    def _draw(self, rng: random.Random, problem_id: str) -> Problem:
        """One random problem: uniform over operand and operator tuples."""
        operands = [
            rng.randint(self.min_operand, self.max_operand) for _ in range(self.num_operands)
        ]
        ops = [rng.choice(self.ops) for _ in range(self.num_operands - 1)]
        expression = str(operands[0])
        for op, value in zip(ops, operands[1:]):
            expression += f" {op} {value}"
        prompt = f"What is {expression}? {self.instruction}".rstrip()
        return Problem(id=problem_id, prompt=prompt, answer=str(evaluate(operands, ops)),
                       metadata={"operands": operands, "ops": ops})
