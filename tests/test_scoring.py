"""Tests for the Scorer: weighted sums, deadlines, failures and threads."""

import threading
import time

import pytest

from actors.scoring import Score, Scorer
from actors.types import ScoreRequest

SLEEPY = "tests.reward_fixtures:sleepy"
BROKEN = "tests.reward_fixtures:broken"


def score_pairs(scorer: Scorer, pairs: list[tuple[str, str]]) -> list[Score]:
    """Each (completion, answer) pair scored as a group of one."""
    return [row[0] for row in scorer.score([ScoreRequest([c], a) for c, a in pairs])]


def test_weighted_sum_and_parts():
    with Scorer({"accuracy": 2.0, "format": 0.5}) as scorer:
        right, wrong, unformatted = score_pairs(scorer, [("so\n#### 7", "7"), ("#### 8", "7"), ("it is 7", "7")]
        )
    assert right == Score(reward=2.5, parts={"accuracy": 1.0, "format": 1.0}, status="ok")
    assert wrong.parts == {"accuracy": 0.0, "format": 1.0} and wrong.reward == 0.5
    assert unformatted.parts == {"accuracy": 1.0, "format": 0.0} and unformatted.reward == 2.0
    assert all(s.ok and s.error is None for s in (right, wrong, unformatted))


def test_empty_batch():
    with Scorer({"accuracy": 1.0}) as scorer:
        assert scorer.score([]) == []


def test_timeout_fails_the_sample_and_the_next_one_scores():
    with Scorer({SLEEPY: 1.0, "accuracy": 1.0}, timeout_s=1) as scorer:
        score_pairs(scorer, [("warm up", "0")])  # child startup is not part of the deadline test
        start = time.monotonic()
        hung, after = score_pairs(scorer, [("sleep please", "1"), ("#### 1", "1")])
        assert time.monotonic() - start < 10
    assert hung.status == "failed" and hung.reward == 0.0 and hung.parts == {}
    assert "timeout after 1 s" in hung.error
    assert after.ok and after.reward == 2.0


def test_raising_reward_fails_only_its_sample():
    with Scorer({BROKEN: 1.0}) as scorer:
        score_pairs(scorer, [("fine", "0")])
        pid = scorer._proc.pid
        before, boom, after = score_pairs(scorer, [("fine", "0"), ("boom", "0"), ("fine", "0")])
        assert scorer._proc.pid == pid  # the child survived the exception
    assert boom.status == "failed" and boom.reward == 0.0
    assert "reward exploded" in boom.error and "RuntimeError" in boom.error
    assert before.ok and after.ok and after.reward == 0.5


def test_dead_child_is_restarted():
    with Scorer({"tests.reward_fixtures:crash": 1.0}) as scorer:
        dead, alive = score_pairs(scorer, [("die", "0"), ("live", "0")])
    assert dead.status == "failed" and "died" in dead.error
    assert alive.ok and alive.reward == 1.0


def test_prints_and_stdin_reads_do_not_break_the_protocol():
    with Scorer({"tests.reward_fixtures:chatty": 1.0}) as scorer:
        assert [s.reward for s in score_pairs(scorer, [("a", "1"), ("b", "2")])] == [1.0, 1.0]


def test_scoring_from_a_non_main_thread():
    results = []
    with Scorer({"accuracy": 1.0}) as scorer:
        thread = threading.Thread(
            target=lambda: results.extend(score_pairs(scorer, [("#### 3", "3"), ("\\boxed{4}", "3")]))
        )
        thread.start()
        thread.join(60)
    assert [(s.status, s.reward) for s in results] == [("ok", 1.0), ("ok", 0.0)]


def test_unknown_function_is_rejected_with_known_names():
    with pytest.raises(ValueError, match="single_number"):
        Scorer({"acuracy": 1.0})
    with pytest.raises(ValueError):
        Scorer({})
    with pytest.raises(ValueError):
        Scorer({"accuracy": 1.0}, timeout_s=0)


def test_close_stops_the_child_and_scoring_restarts_it():
    scorer = Scorer({"single_number": 1.0})
    assert score_pairs(scorer, [("5", "5")])[0].reward == 1.0
    proc = scorer._proc
    scorer.close()
    assert proc.poll() is not None
    assert score_pairs(scorer, [("5 6", "5")])[0].reward == 0.0
    scorer.close()


def test_context_reaches_only_functions_that_ask_for_it():
    request = ScoreRequest(["a reply", "another"], "42", prompt="What is 6 * 7?", metadata={"level": 3})
    names = {f"tests.reward_fixtures.{n}": 1.0 for n in ("with_prompt", "with_metadata", "with_kwargs")}
    with Scorer({**names, "tests.reward_fixtures:broken": 1.0}) as scorer:
        (first, second), = scorer.score([request])
    assert first.ok and second.ok, (first.error, second.error)
    assert first.parts == {"tests.reward_fixtures.with_prompt": len("What is 6 * 7?"),
                           "tests.reward_fixtures.with_metadata": 3.0,
                           "tests.reward_fixtures.with_kwargs": 2.0,  # both prompt and metadata arrived
                           "tests.reward_fixtures:broken": 0.5}


def test_batched_function_scores_the_whole_group_once():
    request = ScoreRequest(["short", "a longer one", "mid size"], "0", metadata={"calls": []})
    with Scorer({"tests.reward_fixtures.rank_by_length": 1.0, "digits": 0.0}) as scorer:
        scores, = scorer.score([request, ScoreRequest([], "0")])[:1]
    assert [s.parts["tests.reward_fixtures.rank_by_length"] for s in scores] == [0.0, 1.0, 0.5]
    assert all(s.ok and "digits" in s.parts for s in scores)


def test_batched_function_errors_fail_the_group_only():
    bad = ScoreRequest(["x", "y"], "wrong-length")  # the fixture returns one reward too few
    good = ScoreRequest(["x", "yy"], "0")
    with Scorer({"tests.reward_fixtures.rank_by_length": 1.0}) as scorer:
        failed, ok = scorer.score([bad, good])
    assert [s.status for s in failed] == ["failed", "failed"] and "returned 1 rewards for a group of 2" in failed[0].error
    assert [s.reward for s in ok] == [0.0, 1.0]
