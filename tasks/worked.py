"""Worked solutions of arithmetic problems: the cold-start SFT data (the think format, or tool calls).

DeepSeek-R1's cold start fine-tunes on a few thousand long, readable solutions before RL, so that
RL starts from a policy that already writes `<think>…</think>` and then the answer. At CPU scale
the arithmetic task writes them: each solution works the expression step by step (products
first, then left to right, as `tasks.arithmetic.evaluate` does), checks its last step by the
inverse operation, and gives the answer after the block. Several phrasings per step, check and
answer, chosen by a seeded generator, keep the model from learning one fixed sentence; some
checks use reflection words ("wait", "verify", "check again") so the reflection rate starts
above zero.

Tool traces (`tool_rows`, the cold start of `experiment=tools_cpu`) are the other kind: the
policy calls the `calculator` with the question's expression, reads its answer and replies with
it, in the Hermes `<tool_call>` format `envs.tools` parses; the final reply is phrased by the
seeded generator too.
"""

from __future__ import annotations

import json
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


TOOL_ANSWER = ("{r}", "The answer is {r}.", "{e} = {r}", "It is {r}.")


def tool_trace(expression: str, result: str, rng: random.Random) -> list[dict[str, str]]:
    """The reply chat of one problem: a calculator call, the tool's answer, the final reply."""
    call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return [{"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": rng.choice(TOOL_ANSWER).format(r=result, e=expression)}]


def tool_rows(task: Any, n: int, seed: int = 0) -> list[dict]:
    """`n` SFT rows {prompt, response (a chat: call, tool answer, reply), answer} of an ArithmeticTask."""
    from envs.tools import calculator

    problems: list[Problem] = task.train_batch(SFT_STEP_OFFSET, n)
    rng = random.Random(stable_seed("tool-traces", seed))
    rows = []
    for p in problems:
        expression = _expression(p.metadata["operands"], p.metadata["ops"])
        rows.append({"prompt": p.prompt, "response": tool_trace(expression, calculator(expression), rng),
                     "answer": p.answer})
    return rows


def _expression(operands: list[int], ops: list[str]) -> str:
    return " ".join([str(operands[0])] + [f"{op} {v}" for op, v in zip(ops, operands[1:])])
