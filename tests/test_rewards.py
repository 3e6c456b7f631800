"""Tests for answer extraction, the math rewards and the reward registry."""

import threading

import pytest

from actors.rewards import REWARDS, UnknownRewardError, resolve
from actors.rewards.math import (
    accuracy,
    accuracy_strict,
    extract_answer,
    format_reward,
    single_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Reasoning...\n#### 42", "42"),
        ("#### -3\n", "-3"),
        ("#### 1 is wrong\nso\n#### 5 apples.", "5 apples"),  # last marker, to end of line
        ("#### 1,234", "1234"),
        ("The answer is \\boxed{17}.", "17"),
        ("\\boxed{1} then \\boxed{\\frac{4}{2}}", "\\frac{4}{2}"),  # last box, nested braces
        ("\\boxed{\\sqrt{\\frac{1}{4}}} and 9", "\\sqrt{\\frac{1}{4}}"),
        ("#### 8\nnot \\boxed{9}", "8"),  # the marker wins over a box
        ("So we get 12 and then 1,234 in total", "1234"),
        ("It costs 3.75 dollars.", "3.75"),
        ("Subtract: 10-3 gives -7 then 4", "4"),
        ("x = -7", "-7"),
        ("no digits here", None),
        ("", None),
        ("#### \nnothing", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_strict_ignores_bare_numbers():
    assert extract_answer("the answer is 5", lenient=False) is None
    assert extract_answer("the answer is \\boxed{5}", lenient=False) == "5"
    assert extract_answer("so\n#### 6", lenient=False) == "6"


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("#### 42", "42", 1.0),
        ("#### 41", "42", 0.0),
        ("#### 007", "7", 1.0),
        ("\\boxed{\\frac{4}{2}}", "2", 1.0),
        ("I think it is 19.", "19", 1.0),
        ("19 or maybe 20", "19", 0.0),
        ("#### -14", "-14", 1.0),
        ("#### 14", "-14", 0.0),
        ("#### 1,234", "1234", 1.0),
        ("no idea", "3", 0.0),
    ],
)
def test_accuracy(completion, answer, expected):
    assert accuracy(completion, answer) == expected


def test_accuracy_strict():
    assert accuracy_strict("The answer is 19", "19") == 0.0
    assert accuracy_strict("#### 19", "19") == 1.0
    assert accuracy_strict("\\boxed{19}", "19") == 1.0


def test_accuracy_works_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(accuracy("#### 2", "2")))
    thread.start()
    thread.join(30)
    assert results == [1.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("12 + 7 = 19\n#### 19", 1.0),
        ("#### 19\n", 1.0),
        ("#### -1,234", 1.0),
        ("#### 19\nthen I kept talking", 0.0),
        ("#### 18\n#### 19", 0.0),
        ("the answer is 19", 0.0),
        ("#### nineteen", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, "19") == expected


@pytest.mark.parametrize(
    "completion, expected",
    [("19", 1.0), ("The answer is -3.5.", 1.0), ("1,234", 1.0), ("12 + 7 = 19", 0.0), ("nineteen", 0.0)],
)
def test_single_number(completion, expected):
    assert single_number(completion, "19") == expected


def test_registry_names():
    assert set(REWARDS) == {"accuracy", "accuracy_strict", "format", "single_number", "digits", "code_tests",
                            "think_format", "language_consistency", "reasoning_gym", "env"}
    assert resolve("format") is format_reward


def test_resolve_import_path():
    fn = resolve("tests.reward_fixtures:broken")
    assert fn("fine", "1") == 0.5
    assert callable(resolve("tests.reward_fixtures:sleepy"))
    assert resolve("actors.rewards.math:accuracy") is accuracy


def test_resolve_dotted_path():
    """The dotted form, which a Hydra override can carry, names the same functions."""
    assert resolve("actors.rewards.math.accuracy") is accuracy
    assert resolve("tests.reward_fixtures.broken") is resolve("tests.reward_fixtures:broken")
    with pytest.raises(UnknownRewardError, match="cannot load reward 'no_such_pkg_xyz.mod.fn': ModuleNotFoundError"):
        resolve("no_such_pkg_xyz.mod.fn")


def test_context_kwargs_and_batched_marker():
    from actors.rewards import batched, context_kwargs, is_batched
    from tests import reward_fixtures as fx

    assert context_kwargs(accuracy) == ()
    assert context_kwargs(fx.with_prompt) == ("prompt",)
    assert context_kwargs(fx.with_metadata) == ("metadata",)
    assert context_kwargs(fx.with_kwargs) == ("prompt", "metadata", "info")
    assert is_batched(fx.rank_by_length) and not is_batched(accuracy)
    assert batched(lambda cs, a: [0.0] * len(cs)).batched


@pytest.mark.parametrize(
    "name", ["acuracy", "tests.reward_fixtures:missing", "no_such_module_xyz:fn", "tests.reward_fixtures:time"]
)
def test_resolve_unknown(name):
    with pytest.raises(ValueError) as info:
        resolve(name)
    assert "accuracy_strict" in str(info.value)  # the message lists the known names
    assert isinstance(info.value, KeyError) and isinstance(info.value, UnknownRewardError)


def test_digits_reward_is_the_digit_fraction():
    from actors.rewards import resolve

    assert resolve("digits")("12 ab", "0") == 2 / 4
    assert resolve("digits")("   ", "0") == 0.0
