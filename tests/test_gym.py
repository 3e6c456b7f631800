"""The reasoning-gym adapter on its real data: a task (tasks/gym.py) and its reward (the
dataset's own score_answer, actors/rewards/gym.py), through the JSON the reward server reads."""

from __future__ import annotations

import json

import pytest

from actors.rewards import REWARDS
from actors.rewards.gym import extract
from common.errors import ConfigError
from tasks import make_task
from tests.test_config import make_cfg


@pytest.fixture(scope="module")
def task():
    return make_task(make_cfg("task.name=reasoning_gym", "task.gym_dataset=leg_counting", "task.test_size=8"))


def test_problems_are_the_datasets_and_repeat_by_step(task):
    a, b = task.train_batch(3, 4), task.train_batch(3, 4)
    assert a == b and a != task.train_batch(4, 4) and a != task.train_batch(3, 4, round=1)
    p = a[0]
    assert "legs" in p.prompt and p.prompt.endswith("Give your final answer alone on the last line.")
    assert p.metadata["gym_dataset"] == "leg_counting" and p.metadata["gym_entry"]["answer"] == p.answer
    assert p.source == "reasoning-gym:leg_counting"
    assert len(task.test_set()) == 8 and {q.id for q in task.test_set()}.isdisjoint({q.id for q in a})


def test_the_reward_is_reasoning_gyms_own_score(task):
    score = REWARDS["reasoning_gym"]
    for p in task.train_batch(0, 6):
        metadata = json.loads(json.dumps(p.metadata))  # what the reward server receives
        assert score(f"Counting each animal...\n{p.answer}", p.answer, metadata=metadata) == 1.0
        assert score(f"so <answer>{p.answer}</answer> legs", p.answer, metadata=metadata) == 1.0
        assert score(f"Counting...\n{int(p.answer) + 1}", p.answer, metadata=metadata) < 1.0
    assert extract("a\n\n 42 \n") == "42" and extract("") == ""


def test_an_unknown_dataset_is_one_clear_error():
    with pytest.raises(ConfigError, match="task.gym_dataset='no_such_set': reasoning-gym cannot make it"):
        make_task(make_cfg("task.name=reasoning_gym", "task.gym_dataset=no_such_set"))


@pytest.mark.slow
def test_smoke_run_on_a_reasoning_gym_dataset(tmp_path, cache_dir):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYGRPO_CACHE"] = cache_dir
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration", "experiment=smoke", "task=reasoning_gym", "reward=gym",
         "task.test_size=4", "rollout.max_prompt_tokens=400", f"output_dir={out}", "logger.progress=false",
         "logger.samples_every_n_steps=1", "logger.samples_prompts=1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [0, 1, 2]
    assert all(r["reward/failed"] == 0 and r["rollout/prompts_dropped"] == 0 for r in rows if "reward/mean" in r)
    assert "eval/accuracy" in rows[0]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(s["source"] == "reasoning-gym:leg_counting" and s["status"] == "ok" for s in samples)
