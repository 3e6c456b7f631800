"""Worked solutions of arithmetic problems in the R1 think format: the cold-start SFT data.

DeepSeek-R1's cold start fine-tunes on a few thousand long, readable solutions before RL, so that
RL starts from a policy that already writes `<think>…</think>` and then the answer. At CPU scale
the arithmetic task writes them: each solution works the expression step by step (products
first, then left to right, as `tasks.arithmetic.evaluate` does), checks its last step by the
inverse operation, and gives the answer after the block. Several phrasings per step, check and
answer, chosen by a seeded generator, keep the model from learning one fixed sentence; some
checks use reflection words ("wait", "verify", "check again") so the reflection rate starts
above zero.
"""

from __future__ import annotations

import random
from typing import Any

from tasks.base import Problem, stable_seed

STEP = {
    "+": ("{a} plus {b} is {c}.", "{a} + {b} = {c}.", "Adding {b} to {a} gives {c}."),
    "-": ("{a} minus {b} is {c}.", "{a} - {b} = {c}.", "Taking {b} away from {a} leaves {c}."),
    "*": ("{a} times {b} is {c}.", "{a} * {b} = {c}."),
}
INVERSE = {"+": "{c} - {b} = {a}", "-": "{c} + {b} = {a}", "*": "{c} / {b} = {a}"}
CHECK = ("Check: {inv}.", "Let me verify: {inv}. Correct.", "Wait, let me check again: {inv}. Yes.",
         "Double-check: {inv}. Right.")
ANSWER = ("{r}", "The answer is {r}.", "{r}")
SFT_STEP_OFFSET = 1_000_000  # cold-start problems come from the training stream far past any RL step


def steps(operands: list[int], ops: list[str]) -> list[tuple[str, int, int, int]]:
    """The expression's steps (op, a, b, a op b): products first, then sums left to right."""
    out: list[tuple[str, int, int, int]] = []
    terms, signs = [operands[0]], ["+"]
    for op, value in zip(ops, operands[1:]):
        if op == "*":
            out.append(("*", terms[-1], value, terms[-1] * value))
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(op)
    total = terms[0]
    for sign, term in zip(signs[1:], terms[1:]):
        new = total + term if sign == "+" else total - term
        out.append((sign, total, term, new))
        total = new
    return out


def worked_solution(operands: list[int], ops: list[str], rng: random.Random, open: str = "<think>",
                    close: str = "</think>") -> str:
    """`<open>` steps and a check `<close>` the answer, phrased by `rng`."""
    work = steps(operands, ops)
    lines = [rng.choice(STEP[op]).format(a=a, b=b, c=c) for op, a, b, c in work]
    op, a, b, c = work[-1]
    if not (op == "*" and b == 0):  # nothing to divide by
        lines.append(rng.choice(CHECK).format(inv=INVERSE[op].format(a=a, b=b, c=c)))
    return f"{open}\n{' '.join(lines)}\n{close}\n{rng.choice(ANSWER).format(r=c)}"


def worked_rows(task: Any, n: int, seed: int = 0, open: str = "<think>", close: str = "</think>") -> list[dict]:
    """`n` SFT rows {prompt, response, answer} for training problems of an ArithmeticTask."""
    problems: list[Problem] = task.train_batch(SFT_STEP_OFFSET, n)
    rng = random.Random(stable_seed("worked", seed))
    return [{"prompt": p.prompt, "response": worked_solution(p.metadata["operands"], p.metadata["ops"], rng, open,
                                                              close), "answer": p.answer} for p in problems]
