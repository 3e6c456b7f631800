"""The driver's step assembly without actors: DAPO dynamic sampling, overlong shaping and
KL-in-reward, with small stand-in pools that behave like the real ones (deterministic rewards)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from actors.scoring import Score
from actors.types import Completion, GenerateResult, Group
from orchestration.config import Config
from orchestration.driver import Timer, make_batch, sample_groups
from tasks.arithmetic import ArithmeticTask


class Engines:
    """Completions whose text is the prompt id; lengths 1..G."""

    def generate(self, prompts, spec):
        groups = [Group(p, [1, 2], [Completion([7] * (j + 1), [-0.5] * (j + 1), "stop", p.id)
                                    for j in range(spec.n)], 0) for p in prompts]
        return GenerateResult(groups)


class Rewards:
    """First-round prompts with an even index get all-equal rewards; all others are informative."""

    def score(self, groups, answers):
        def flat(g):
            step, index = g.prompt.id.split("/")[1:]
            return "." not in step and int(index) % 2 == 0
        return [[Score(1.0 if flat(g) else float(j), {}, "ok") for j in range(len(g.completions))]
                for g in groups]


def cfg_with(**algo):
    cfg = OmegaConf.structured(Config())
    cfg.model.path = "builtin:tiny-qwen2"
    cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens = 4, 4, 4
    for k, v in algo.items():
        cfg.algo[k] = v
    return cfg


def sample(cfg):
    actors = SimpleNamespace(rollout=Engines(), rewards=Rewards())
    spec = SimpleNamespace(n=cfg.rollout.group_size)
    return sample_groups(cfg, ArithmeticTask(seed=0), step=3, actors=actors, spec=spec, timer=Timer())


def test_without_dynamic_sampling_all_groups_are_kept():
    out = sample(cfg_with())
    assert len(out.groups) == 4
    assert out.metrics == {"sampling/rounds": 1.0, "sampling/generated_groups": 4.0, "sampling/dropped_groups": 0.0}


def test_dynamic_sampling_drops_all_equal_groups_and_draws_more():
    out = sample(cfg_with(dynamic_sampling=True, max_sampling_rounds=5))
    # round 0: 4 drawn, 2 informative; round 1: 2 more drawn (new problems), both informative
    assert out.metrics == {"sampling/rounds": 2.0, "sampling/generated_groups": 6.0, "sampling/dropped_groups": 2.0}
    ids = [g.prompt.id for g in out.groups]
    assert ids == ["train/3/1", "train/3/3", "train/3.1/0", "train/3.1/1"]
    assert all(len({s.reward for s in row}) > 1 for row in out.scores)


def test_dynamic_sampling_stops_at_the_round_limit():
    out = sample(cfg_with(dynamic_sampling=True, max_sampling_rounds=1))
    assert len(out.groups) == 2 and out.metrics["sampling/dropped_groups"] == 2.0


class Reference:
    def __init__(self):
        self.calls = 0

    def reference_kl(self, batch, estimator):
        self.calls += 1
        assert estimator == "k1"
        return [0.1 * len(c) for c in batch.completion_ids]  # KL grows with length


def test_overlong_shaping_and_kl_in_reward_change_the_advantages():
    cfg = cfg_with(overlong_buffer=2, overlong_factor=1.0, scale_by_std=False, kl_coef=1.0, kl_in="reward",
                   kl_estimator="k1")
    sampled = sample(cfg)
    ref = Reference()
    batch, rewards, padded = make_batch(cfg, sampled, ref)
    assert ref.calls == 1 and padded == 0
    # group 0 (train/3/0) is all-equal; group 1 (informative): rewards [0, 1, 2, 3], lengths [1, 2, 3, 4], max 4, buffer 2:
    # overlong penalty [0, 0, -0.5, -1]; KL-in-reward −0.1·L: [-.1, -.2, -.3, -.4]
    shaped = torch.tensor([0.0, 1.0, 2.0, 3.0]) + torch.tensor([0, 0, -0.5, -1]) - torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert batch.advantages[4:8] == pytest.approx((shaped - shaped.mean()).tolist(), abs=1e-6)
    assert rewards[1].tolist() == [0.0, 1.0, 2.0, 3.0]  # metrics see the unshaped rewards


def test_kl_in_loss_does_not_query_the_reference_for_rewards():
    cfg = cfg_with(kl_coef=0.5, kl_in="loss")
    ref = Reference()
    make_batch(cfg, sample(cfg), ref)
    assert ref.calls == 0


def test_sample_rows_carry_prompt_answer_parts_and_version():
    from orchestration.driver import sample_rows

    out = sample(cfg_with())
    rows = sample_rows(out, 2)
    assert len(rows) == 2 * 4  # 2 prompts × G completions
    problem = out.problems[rows[0]["prompt_id"]]
    assert rows[0]["prompt"] == problem.prompt and rows[0]["answer"] == problem.answer
    assert [r["reward"] for r in rows[4:]] == [0.0, 1.0, 2.0, 3.0]  # the informative second prompt
    assert {r["policy_version"] for r in rows} == {0} and rows[0]["status"] == "ok"
