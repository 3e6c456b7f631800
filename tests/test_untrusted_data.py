"""Hostile data at the reward server's boundary: replies written into its pipe by code it runs,
malformed replies, and the environment reward functions (and the code they run) can see."""

from __future__ import annotations

import datetime
import pickle
import time

import numpy as np
import pytest

from actors.reward_server import MAX_MESSAGE_BYTES, ProtocolError, pack, unpack
from actors.scoring import PROJECT_ROOT, Scorer, check_reply, reward_env
from actors.types import ScoreRequest
from tests.reward_fixtures import hostile_pickle

FIXTURES = "tests.reward_fixtures:"


def score_one(scorer: Scorer, completion: str):
    return scorer.score([ScoreRequest([completion], "0")])[0][0]


def test_the_hostile_pickle_is_live(tmp_path):
    """The payload the attack writes really runs code when unpickled (so the next test means something)."""
    marker = tmp_path / "ran"
    pickle.loads(hostile_pickle(str(marker)))
    assert marker.exists()


def test_a_pickle_written_into_the_reply_pipe_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    with Scorer({FIXTURES + "forge_pickle": 1.0}) as scorer:
        before = score_one(scorer, "benign")
        pid = scorer._proc.pid
        attacked = score_one(scorer, f"attack:{marker}")
        after = score_one(scorer, "benign")
        assert scorer._proc.pid != pid  # the child that wrote it was replaced
    assert not marker.exists()
    assert before.ok and before.reward == 0.0
    assert attacked.status == "failed" and "malformed reply from reward server" in attacked.error
    assert after.ok and after.reward == 0.0


def test_a_forged_json_reply_without_the_request_id_is_refused():
    with Scorer({FIXTURES + "forge_json": 1.0}) as scorer:
        forged, after = score_one(scorer, "attack"), score_one(scorer, "benign")
    assert forged.status == "failed" and forged.reward == 0.0  # not the 1.0 it claimed
    assert "not a reply to this request" in forged.error
    assert after.ok and after.reward == 0.0


def test_a_reply_announcing_more_than_the_cap_fails_at_once():
    with Scorer({FIXTURES + "announce_huge": 1.0}, timeout_s=30) as scorer:
        score_one(scorer, "warm up")
        start = time.monotonic()
        huge = score_one(scorer, "attack")
        assert time.monotonic() - start < 10  # refused on the header, not read for 30 s
        after = score_one(scorer, "benign")
    assert huge.status == "failed" and "over the" in huge.error and "cap" in huge.error
    assert after.ok and after.reward == 1.0


ID, NAMES = "abc", frozenset({"a"})


@pytest.mark.parametrize("reply", [
    ["ok", {"a": True}, ID],  # a bool is not a reward
    ["ok", {"a": "1.0"}, ID],
    ["ok", {"a": [1.0]}, ID],
    ["ok", {"a": {"b": 1.0}}, ID],
    ["ok", {"a": 1}, ID],  # the server sends floats; anything else did not come from it
    ["ok", {}, ID],
    ["ok", {"a": 1.0, "b": 1.0}, ID],
    ["ok", [{"a": 1.0}], ID],  # a group's shape for a sample
    ["OK", {"a": 1.0}, ID],
    ["ready", None, ID],
    ["ok", {"a": 1.0}],
    ["ok", {"a": 1.0}, "abd"],
    ["ok", {"a": 1.0}, ID, "extra"],
    {"status": "ok", "parts": {"a": 1.0}},
    "ok",
    None,
    ["error", 3, ID],
    ["error", ["nested"], ID],
])
def test_malformed_sample_replies_are_refused(reply):
    with pytest.raises(ProtocolError):
        check_reply(reply, ID, NAMES, None)


@pytest.mark.parametrize("reply", [
    ["ok", [{"a": 1.0}], ID],  # one too few
    ["ok", [{"a": 1.0}, {"a": 1.0}, {"a": 1.0}], ID],
    ["ok", {"a": 1.0}, ID],
    ["ok", [{"a": 1.0}, {"a": False}], ID],
    ["ok", [{"a": 1.0}, None], ID],
])
def test_malformed_group_replies_are_refused(reply):
    with pytest.raises(ProtocolError):
        check_reply(reply, ID, NAMES, 2)


def test_well_formed_replies_pass():
    assert check_reply(["ok", {"a": 0.5}, ID], ID, NAMES, None) == ("ok", {"a": 0.5})
    assert check_reply(["ok", [{"a": 0.5}, {"a": -1.0}], ID], ID, NAMES, 2) == ("ok", [{"a": 0.5}, {"a": -1.0}])
    assert check_reply(["error", "a: ValueError: x", ID], ID, NAMES, 2) == ("error", "a: ValueError: x")
    assert len(check_reply(["error", "x" * 10**6, ID], ID, NAMES, None)[1]) < 10**4  # logs stay readable


def test_framing_caps_and_refuses_what_is_not_json():
    assert unpack(pack(["ok", {"a": 1.5}, ID])[8:]) == ["ok", {"a": 1.5}, ID]
    with pytest.raises(ProtocolError, match="cap"):
        pack("x" * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        unpack(hostile_pickle("/nonexistent/marker"))


def test_requests_keep_numbers_lists_and_dicts_exact_and_stringify_the_rest():
    metadata = {"n": 3, "x": 0.1, "big": 2**62, "nested": {"a": [1, 2.5, None, True]},
                "when": datetime.datetime(2024, 1, 2, 3, 4, 5), "tags": {"t"}, "np": np.int64(7)}
    request = ScoreRequest(["a reply"], "0", prompt=({"role": "user", "content": "hi"},), metadata=metadata)
    with Scorer({FIXTURES + "check_context": 1.0}) as scorer:
        (score,), = scorer.score([request])
    assert score.ok, score.error


def test_reward_functions_see_no_secrets_but_what_pass_env_names(monkeypatch):
    secrets = {"WANDB_API_KEY": "w", "RAY_AUTH_TOKEN": "r", "AWS_SECRET_ACCESS_KEY": "a", "HF_TOKEN": "h",
               "RAYGRPO_TEST_SECRET": "s", "MY_SERVICE_PASSWORD": "p"}
    for name, value in {**secrets, "OPENAI_API_KEY": "o", "OMP_NUM_THREADS": "1", "RAYGRPO_CACHE": "/c"}.items():
        monkeypatch.setenv(name, value)
    names = [*secrets, "OPENAI_API_KEY", "OMP_NUM_THREADS", "RAYGRPO_CACHE"]
    with Scorer({FIXTURES + "sees_env": 1.0}, pass_env=("OPENAI_API_KEY",)) as scorer:
        seen = {name: s.reward for name, (s,) in zip(names, scorer.score([ScoreRequest([n], "0") for n in names]))}
    assert seen == {**{name: 0.0 for name in secrets}, "OPENAI_API_KEY": 1.0, "OMP_NUM_THREADS": 1.0,
                    "RAYGRPO_CACHE": 1.0}


def test_the_allowlisted_environment():
    parent = {"PATH": "/bin", "LC_ALL": "C", "RAYGRPO_CACHE": "/c", "RAYGRPO_API_TOKEN": "t", "HF_TOKEN": "h",
              "HF_HOME": "/hf", "GITHUB_TOKEN": "g", "PYTHONPATH": "/mine", "JUDGE_KEY": "j", "LD_PRELOAD": "/x.so"}
    env = reward_env(("JUDGE_KEY", "NOT_SET"), parent)
    assert env == {"PATH": "/bin", "LC_ALL": "C", "RAYGRPO_CACHE": "/c", "HF_HOME": "/hf", "JUDGE_KEY": "j",
                   "PYTHONPATH": f"{PROJECT_ROOT}:/mine"}
    with pytest.raises(ValueError, match="pass_env"):
        Scorer({"accuracy": 1.0}, pass_env=("A=B",))
