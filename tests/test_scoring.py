"""Tests for the Scorer: weighted sums, deadlines, failures and threads."""

import threading
import time

import pytest

from actors.scoring import Score, Scorer

SLEEPY = "tests.reward_fixtures:sleepy"
BROKEN = "tests.reward_fixtures:broken"


def test_weighted_sum_and_parts():
    with Scorer({"accuracy": 2.0, "format": 0.5}) as scorer:
        right, wrong, unformatted = scorer.score(
            [("so\n#### 7", "7"), ("#### 8", "7"), ("it is 7", "7")]
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
        scorer.score([("warm up", "0")])  # child startup is not part of the deadline test
        start = time.monotonic()
        hung, after = scorer.score([("sleep please", "1"), ("#### 1", "1")])
        assert time.monotonic() - start < 10
    assert hung.status == "failed" and hung.reward == 0.0 and hung.parts == {}
    assert "timeout after 1 s" in hung.error
    assert after.ok and after.reward == 2.0


def test_raising_reward_fails_only_its_sample():
    with Scorer({BROKEN: 1.0}) as scorer:
        scorer.score([("fine", "0")])
        pid = scorer._proc.pid
        before, boom, after = scorer.score([("fine", "0"), ("boom", "0"), ("fine", "0")])
        assert scorer._proc.pid == pid  # the child survived the exception
    assert boom.status == "failed" and boom.reward == 0.0
    assert "reward exploded" in boom.error and "RuntimeError" in boom.error
    assert before.ok and after.ok and after.reward == 0.5


def test_dead_child_is_restarted():
    with Scorer({"tests.reward_fixtures:crash": 1.0}) as scorer:
        dead, alive = scorer.score([("die", "0"), ("live", "0")])
    assert dead.status == "failed" and "died" in dead.error
    assert alive.ok and alive.reward == 1.0


def test_prints_and_stdin_reads_do_not_break_the_protocol():
    with Scorer({"tests.reward_fixtures:chatty": 1.0}) as scorer:
        assert [s.reward for s in scorer.score([("a", "1"), ("b", "2")])] == [1.0, 1.0]


def test_scoring_from_a_non_main_thread():
    results = []
    with Scorer({"accuracy": 1.0}) as scorer:
        thread = threading.Thread(
            target=lambda: results.extend(scorer.score([("#### 3", "3"), ("\\boxed{4}", "3")]))
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
    assert scorer.score([("5", "5")])[0].reward == 1.0
    proc = scorer._proc
    scorer.close()
    assert proc.poll() is not None
    assert scorer.score([("5 6", "5")])[0].reward == 0.0
    scorer.close()
