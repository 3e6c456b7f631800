"""Tests for the R1-recipe rewards (think format, language consistency) and reasoning metrics."""

import pytest

from actors.rewards import REWARDS, resolve
from actors.rewards.reasoning import (
    language_consistency,
    make_language_consistency,
    make_think_format,
    split_think,
    think_format,
    word_scripts,
)
from orchestration.report.reasoning import (
    answer_only_in_think,
    length_stats,
    ngram_repetition,
    reasoning_metrics,
    reflection_rate,
    repetition,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>\n2+2 is 4\n</think>\nThe answer is 4.", 1.0),  # well-formed
        ("2+2 is 4\n</think>\nThe answer is 4.", 1.0),  # the chat template opened the block
        ("  \n<think>2+2 is 4</think>4", 1.0),  # leading whitespace is fine
        ("<think>a</think><think>b</think>4", 0.0),  # two blocks
        ("<think>a</think>4<think>b</think>5", 0.0),  # two blocks, answers between
        ("<think>a<think>b</think>4", 0.0),  # two opening tags
        ("<think>2+2 is 4, so 4", 0.0),  # missing close tag (truncated)
        ("<think>2+2 is 4</think>  \n", 0.0),  # empty answer
        ("<think>\n</think>\n4", 0.0),  # empty reasoning
        ("Sure. <think>2+2 is 4</think>4", 0.0),  # text before the opening tag
        ("<think>2+2</think>4 </think>", 0.0),  # a stray close tag in the answer
        ("<think>2+2</think>4 <think>", 0.0),  # a stray open tag in the answer
        ("The answer is 4", 0.0),  # no tags
        ("", 0.0),
    ],
)
def test_think_format(completion, expected):
    assert think_format(completion, "4") == expected


def test_think_format_custom_tags():
    fn = make_think_format("<reasoning>", "</reasoning>")
    assert fn("<reasoning>2+2</reasoning>4", "4") == 1.0
    assert fn("<think>2+2</think>4", "4") == 0.0
    with pytest.raises(ValueError, match="two different"):
        make_think_format("|", "|")


def test_split_think():
    assert split_think("<think>a</think>b") == ("a", "b")
    assert split_think("a</think>b</think>c") == ("a", "b</think>c")  # first close, as vLLM
    assert split_think("x<think>a</think>") == ("a", "")
    assert split_think("<think>a") is None


def test_word_scripts():
    assert word_scripts("x计算 2+3") == ["latin", "han", "han"]  # a script change ends a word
    assert word_scripts("cafe\u0301 naïve don't") == ["latin"] * 4  # NFKC joins the accent
    assert word_scripts("ｌｅｔ ひらがな 안녕 Да") == ["latin"] + ["kana"] * 4 + ["hangul", "cyrillic"]
    assert word_scripts("3.14 + 2 = ?") == []


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>Let me add 2 and 3</think>5", 1.0),
        ("<think>我们 compute 2+3 then 计算</think>5", 2 / 6),  # 4 Han characters, 2 Latin words
        ("<think>add them</think>答案是五", 1.0),  # only the reasoning counts
        ("Сложим два и три, then add", 2 / 6),  # no block: the whole reply
        ("<think>Let me 计算", 2 / 4),  # unclosed block: after the opening tag
        ("<think>Let θ = 30°, so sin θ = 1/2</think>", 1.0),  # Greek letters are math symbols
        ("<think>2 + 3 = 5</think>5", 0.0),  # numbers only
        ("<think></think>5", 0.0),  # empty reasoning
        ("", 0.0),
    ],
)
def test_language_consistency_latin(completion, expected):
    assert language_consistency(completion, "5") == pytest.approx(expected)


def test_language_consistency_other_scripts():
    cjk, cyrillic, greek = (make_language_consistency(s) for s in ("cjk", "cyrillic", "greek"))
    assert cjk("<think>我们 compute 2+3 then 计算</think>", "") == pytest.approx(4 / 6)
    assert cjk("<think>안녕 하세요 ok</think>", "") == pytest.approx(2 / 3)  # Hangul: spaced words
    assert cjk("<think>ひらがな abc</think>", "") == pytest.approx(4 / 5)  # kana: per character
    assert cyrillic("Сложим два и три, then add", "") == pytest.approx(4 / 6)
    assert greek("Let θ", "") == pytest.approx(1 / 2)  # Greek counts when it is the target
    with pytest.raises(ValueError, match="unknown script 'klingon'"):
        make_language_consistency("klingon")


def test_registry_resolves_the_new_rewards():
    assert REWARDS["think_format"] is think_format and resolve("think_format") is think_format
    assert resolve("language_consistency") is language_consistency
    assert resolve("actors.rewards.reasoning.think_format") is think_format


def test_new_rewards_compose_by_weight_through_the_scorer():
    from actors.scoring import Scorer
    from actors.types import ScoreRequest

    weights = {"think_format": 1.0, "language_consistency": 0.5, "accuracy": 2.0}
    with Scorer(weights) as scorer:
        good, bad = scorer.score([ScoreRequest(["<think>Add 2 and 3, 计算</think>#### 5", "#### 5"], "5")])[0]
    assert good.parts == {"think_format": 1.0, "language_consistency": 0.5, "accuracy": 1.0}
    assert good.reward == pytest.approx(1.0 + 0.5 * 0.5 + 2.0)
    assert bad.parts == {"think_format": 0.0, "language_consistency": 0.0, "accuracy": 1.0}
    assert bad.reward == pytest.approx(2.0)


def test_length_stats():
    assert length_stats([40, 10, 100, 30, 20]) == {
        "length_mean": 40.0, "length_p50": 30.0, "length_p90": pytest.approx(76.0), "length_max": 100.0
    }  # p90: rank 0.9 * 4 = 3.6 between 40 and 100 -> 40 + 0.6 * 60
    assert length_stats([7]) == {"length_mean": 7.0, "length_p50": 7.0, "length_p90": 7.0, "length_max": 7.0}
    assert length_stats([]) == {}


def test_reflection_rate():
    texts = ["Wait, that is wrong.", "We double-check: ok", "The waiter came", "Let me\ncheck this",
             "checking again", "no markers", "A MISTAKE", "re-check it"]
    assert reflection_rate(texts) == 5 / 8  # not "waiter", not "checking again"
    assert reflection_rate(texts, markers=["hmm"]) == 0.0
    assert reflection_rate(["hmm.", "HMM", "hmmm"], markers=["hmm"]) == pytest.approx(2 / 3)
    assert reflection_rate([]) == 0.0


def test_answer_only_in_think():
    texts = ["<think>a</think>4", "<think>answer is 4</think>\n  ", "answer is 4</think>",
             "<think>no close 4", "plain 4"]
    assert answer_only_in_think(texts) == pytest.approx(2 / 5)
    assert answer_only_in_think(["<r>4</r>", "<think>4</think>"], "<r>", "</r>") == 0.5


def test_ngram_repetition():
    assert repetition("a b c d a b c d") == pytest.approx(1 - 4 / 5)  # abcd twice among 5 4-grams
    assert repetition("A b c d a B c D") == pytest.approx(0.2)  # lowercased, as open-r1
    assert repetition("x y z w v") == 0.0
    assert repetition("a b c") == 0.0  # fewer than n tokens
    assert repetition("a a b", n=1) == pytest.approx(1 / 3)
    assert ngram_repetition(["a b c d a b c d", "a b c"]) == pytest.approx(0.1)
    assert ngram_repetition([]) == 0.0


def test_reasoning_metrics():
    texts = ["<think>Wait, 2+2</think>4", "<think>go go go go go go go</think>"]  # 7 tokens, 3 distinct 4-grams of 4
    out = reasoning_metrics(texts, [10, 30])
    assert out == {
        "reasoning/length_mean": 20.0, "reasoning/length_p50": 20.0,
        "reasoning/length_p90": pytest.approx(28.0), "reasoning/length_max": 30.0,
        "reasoning/reflection_rate": 0.5, "reasoning/answer_only_in_think": 0.5,
        "reasoning/ngram_repetition": pytest.approx((0 + (1 - 3 / 4)) / 2),
    }
    assert reasoning_metrics([], []) == {}
    with pytest.raises(ValueError, match="2 texts but 1 lengths"):
        reasoning_metrics(texts, [3])
