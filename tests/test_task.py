"""Tests for the procedurally generated arithmetic task."""

import re

import pytest

from tasks.arithmetic import ArithmeticTask, Problem, evaluate

PROMPT_RE = re.compile(r"What is ((\d+)(?: [-+*] \d+)+)\? (.*)")


def expression(problem: Problem) -> str:
    return PROMPT_RE.fullmatch(problem.prompt).group(1)


def test_deterministic_per_seed_and_step():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert a.test_set() == b.test_set()
    assert a.train_batch(5, 32) == b.train_batch(5, 32)
    other = ArithmeticTask(seed=4)
    assert other.test_set() != a.test_set()
    assert other.train_batch(5, 32) != a.train_batch(5, 32)


def test_steps_differ_and_ids_are_unique():
    task = ArithmeticTask()
    first, second = task.train_batch(0, 32), task.train_batch(1, 32)
    assert [p.prompt for p in first] != [p.prompt for p in second]
    ids = [p.id for p in first + second + task.test_set()]
    assert len(ids) == len(set(ids))


def test_test_set_size_and_distinct():
    task = ArithmeticTask(test_size=100)
    prompts = [p.prompt for p in task.test_set()]
    assert len(prompts) == 100 and len(set(prompts)) == 100


def test_train_and_test_are_disjoint_over_many_steps():
    task = ArithmeticTask(max_operand=12, test_size=100)  # 288 expressions, many collisions
    test = {expression(p) for p in task.test_set()}
    seen = set()
    for step in range(200):
        seen.update(expression(p) for p in task.train_batch(step, 16))
    assert not seen & test
    assert len(seen) > 150  # the rest of the space is actually used for training


@pytest.mark.parametrize("ops", ["+-", "*", "+-*"])
def test_answers_are_correct(ops):
    task = ArithmeticTask(ops=ops, num_operands=4, max_operand=9)
    for problem in task.train_batch(0, 20) + task.test_set()[:20]:
        expr = expression(problem)
        assert re.fullmatch(r"[\d +*-]+", expr)
        assert problem.answer == str(eval(expr, {"__builtins__": {}}))  # independent check


def test_operand_ranges_ops_and_instruction():
    task = ArithmeticTask(min_operand=5, max_operand=7, num_operands=3, ops="*",
                          test_size=10, instruction="Reply tersely.")
    for problem in task.test_set() + task.train_batch(2, 30):
        match = PROMPT_RE.fullmatch(problem.prompt)
        assert match.group(3) == "Reply tersely."
        tokens = match.group(1).split()
        assert all(5 <= int(t) <= 7 for t in tokens[::2])
        assert len(tokens[::2]) == 3 and set(tokens[1::2]) == {"*"}


def test_default_prompt_shape():
    problem = ArithmeticTask().test_set()[0]
    assert re.fullmatch(r"What is \d+ [-+] \d+\? Answer with just the number\.", problem.prompt)


def test_evaluate_respects_precedence():
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([10, 2, 3, 4], ["-", "*", "-"]) == 0
    assert evaluate([3, 17], ["-"]) == -14


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_operands": 1},
        {"num_operands": 5},
        {"ops": ""},
        {"ops": "+/"},
        {"min_operand": 10, "max_operand": 5},
        {"min_operand": -1},
        {"test_size": -1},
        {"max_operand": 3, "test_size": 100},  # more than half of 18 expressions
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ArithmeticTask(**kwargs)


def test_bad_batch_arguments_raise():
    with pytest.raises(ValueError):
        ArithmeticTask().train_batch(-1, 4)
