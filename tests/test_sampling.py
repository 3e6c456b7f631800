"""The driver's step assembly without actors: DAPO dynamic sampling, overlong shaping,
KL-in-reward and production ahead of the learner (staleness bound), with small stand-in pools
that behave like the real ones (deterministic rewards, groups streamed out of order)."""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from actors.scoring import Score
from actors.types import Completion, GenerateResult, Group, SamplingSpec
from orchestration.config import Config
from orchestration.train.loop import make_batch
from orchestration.train.producer import Producer
from tasks.arithmetic import ArithmeticTask


class Engines:
    """Completions whose text is the prompt id; lengths 1..G; groups streamed last prompt first,
    stamped with the version the engine holds when it starts (`load` sets it)."""

    def __init__(self):
        self.version = 0
        self.seeds: dict[str, int] = {}  # prompt id -> the sampling seed it was asked with

    def load(self, version):
        self.version = version

    def stream(self, prompts, specs):
        version = self.version
        yield GenerateResult([], [])
        for p, spec in reversed(list(zip(prompts, specs))):
            self.seeds[p.id] = spec.seed
            yield GenerateResult([Group(p, [1, 2], [Completion([7] * (j + 1), [-0.5] * (j + 1), "stop", p.id)
                                                    for j in range(spec.n)], version)])


class Rewards:
    """First-round prompts with an even index get all-equal rewards; all others are informative."""

    def submit(self, requests):
        def flat(text):
            step, index = text.split("/")[1:]
            return "." not in step and int(index) % 2 == 0
        return [[Score(1.0 if flat(r.completions[0]) else float(j), {}, "ok") for j in range(len(r.completions))]
                for r in requests]

    def gather(self, job):
        return job


def cfg_with(**algo):
    cfg = OmegaConf.structured(Config())
    cfg.model.path = "builtin:tiny-qwen2"
    cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens = 4, 4, 4
    for k, v in algo.items():
        cfg.algo[k] = v
    return cfg


def producer(cfg, engines=None):
    spec = SamplingSpec(n=cfg.rollout.group_size)
    return Producer(cfg, ArithmeticTask(seed=0), engines or Engines(), Rewards(), spec)


def sample(cfg):
    return producer(cfg).produce(3)


def counts(metrics):
    return {k: v for k, v in metrics.items() if k.startswith("sampling/")}


def test_without_dynamic_sampling_all_groups_are_kept_in_prompt_order():
    out = sample(cfg_with())
    assert [g.prompt.id for g in out.groups] == [f"train/3/{i}" for i in range(4)]  # streamed in reverse
    assert [s.reward for s in out.scores[0]] == [1.0] * 4 and [s.reward for s in out.scores[1]] == [0.0, 1.0, 2.0, 3.0]
    assert counts(out.metrics) == {"sampling/rounds": 1.0, "sampling/generated_groups": 4.0,
                                   "sampling/dropped_groups": 0.0}


def test_sampling_seeds_are_a_function_of_seed_step_round_and_prompt():
    cfg = cfg_with(dynamic_sampling=True, max_sampling_rounds=3)
    first, again, other_seed = Engines(), Engines(), Engines()
    producer(cfg, first).produce(3)
    producer(cfg, again).produce(3)
    assert first.seeds == again.seeds and len(first.seeds) > cfg.rollout.prompts_per_step  # several rounds
    assert len(set(first.seeds.values())) == len(first.seeds)  # every prompt of every round its own seed
    producer(cfg, first).produce(4)
    assert len(set(first.seeds.values())) == len(first.seeds)  # and every step
    cfg.seed = 1
    producer(cfg, other_seed).produce(3)
    assert set(other_seed.seeds.values()).isdisjoint(again.seeds.values())


def test_dynamic_sampling_drops_all_equal_groups_and_draws_more():
    out = sample(cfg_with(dynamic_sampling=True, max_sampling_rounds=5))
    # round 0: 4 drawn, 2 informative; round 1: 2 more drawn (new problems), both informative
    assert counts(out.metrics) == {"sampling/rounds": 2.0, "sampling/generated_groups": 6.0,
                                   "sampling/dropped_groups": 2.0}
    ids = [g.prompt.id for g in out.groups]
    assert ids == ["train/3/1", "train/3/3", "train/3.1/0", "train/3.1/1"]
    assert all(len({s.reward for s in row}) > 1 for row in out.scores)


def test_dynamic_sampling_stops_at_the_round_limit():
    out = sample(cfg_with(dynamic_sampling=True, max_sampling_rounds=1))
    assert len(out.groups) == 2 and out.metrics["sampling/dropped_groups"] == 2.0


@pytest.mark.parametrize("k", [0, 1, 2])
def test_productions_run_ahead_by_at_most_k_versions(k):
    """The driver's order: take(step), train, load version step + 1 — which on a real engine waits
    behind the generations already queued (as here). Completions trained at step s must come from
    version >= s - k, and with k >= 1 the productions must really run ahead (overlap)."""
    cfg = cfg_with()
    cfg.steps, cfg.rollout.max_staleness = 6, k
    engines = Engines()
    p = producer(cfg, engines)
    lags = []
    try:
        for step in range(cfg.steps):
            out = p.take(step)
            lags += [step - g.version for g in out.groups]
            if p.thread:
                p.thread.submit(lambda: None).result()  # what is queued runs before the load
            engines.load(step + 1)
    finally:
        p.close()
    assert min(lags) >= 0 and max(lags) <= k
    assert max(lags) == k if k else set(lags) == {0}


def test_evaluations_come_back_in_order_with_their_step():
    cfg = cfg_with()
    cfg.steps, cfg.rollout.max_staleness = 3, 1
    p = producer(cfg)
    try:
        for step in range(3):
            p.evaluate(lambda step=step: f"eval of {step}")
            p.take(step)
        assert p.finished_evals(wait=True)[-1] == "eval of 2"
        assert p.finished_evals(wait=True) == []
    finally:
        p.close()


# --------------------------------------------------------------------------- multi-turn trajectories


def trajectory(prompt_id: str, j: int, k: int) -> Completion:
    """Completion j of the k-th prompt of a call: a reply of j + 1 tokens 5, an observation of k + 1
    tokens 100 + k, a reply of two tokens 6 — each completion's mask its own, so one moved shows."""
    mask = [1] * (j + 1) + [0] * (k + 1) + [1, 1]
    return Completion([5] * (j + 1) + [100 + k] * (k + 1) + [6, 6], [-0.5 if m else 0.0 for m in mask], "stop",
                      prompt_id, mask=mask, info={"turns": 2.0, "policy_tokens": j + 3.0, "env_tokens": k + 1.0},
                      turns=[{"role": "assistant", "content": "call"}, {"role": "tool", "content": f"obs {k}"},
                             {"role": "assistant", "content": prompt_id}])


class TrajectoryEngines(Engines):
    """Engines whose groups are multi-turn trajectories (`trajectory`), streamed last prompt first."""

    def stream(self, prompts, specs):
        version = self.version
        for k, (p, spec) in reversed(list(enumerate(zip(prompts, specs)))):
            self.seeds[p.id] = spec.seed
            yield GenerateResult([Group(p, [1, 2], [trajectory(p.id, j, k) for j in range(spec.n)], version)])


def assert_whole(groups):
    """Each group's completions are the trajectories generated for it, mask and all."""
    for g in groups:
        k = int(g.prompt.id.split("/")[-1])  # the prompt's index in its round's call
        assert g.completions == [trajectory(g.prompt.id, j, k) for j in range(len(g.completions))], g.prompt.id


def test_dynamic_sampling_keeps_trajectories_whole_with_their_masks_aligned():
    cfg = cfg_with(dynamic_sampling=True, max_sampling_rounds=5, overlong_buffer=2, scale_by_std=False)
    cfg.learner.num_ranks = 3  # 16 sequences: two zero-weight copies pad the batch to 18
    out = producer(cfg, TrajectoryEngines()).produce(3)
    assert [g.prompt.id for g in out.groups] == ["train/3/1", "train/3/3", "train/3.1/0", "train/3.1/1"]
    assert counts(out.metrics) == {"sampling/rounds": 2.0, "sampling/generated_groups": 6.0,
                                   "sampling/dropped_groups": 2.0}
    assert_whole(out.groups)
    batch, rewards, padded = make_batch(cfg, out, Reference())
    masks = [c.mask for g in out.groups for c in g.completions]
    assert padded == 2 and batch.token_mask == masks + [masks[-1]] * 2 and batch.loss_weights[16:] == [0.0, 0.0]
    for ids, mask, logprobs in zip(batch.completion_ids, batch.token_mask, batch.rollout_logprobs):
        assert [t < 100 for t in ids] == [m == 1 for m in mask] == [lp != 0 for lp in logprobs]
    # rewards [0, 1, 2, 3]; longest replies [2, 2, 3, 4] against max 4, buffer 2: penalty [0, 0, -.5, -1]
    # (the whole trajectories, 5 to 10 tokens, would all be punished in full)
    shaped = torch.tensor([0.0, 1.0, 1.5, 2.0])
    assert batch.advantages[:4] == pytest.approx((shaped - shaped.mean()).tolist(), abs=1e-6)
    assert rewards[0].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_trajectories_produced_ahead_keep_their_mask_and_version(k, dynamic):
    """Overlap (the staleness-bounded producer) with multi-turn groups: every step gets the groups
    it should (none lost, none twice), whole, each stamped with the version that sampled it, at
    most k behind."""
    cfg = cfg_with(dynamic_sampling=dynamic, max_sampling_rounds=5)
    cfg.steps, cfg.rollout.max_staleness = 5, k
    engines = TrajectoryEngines()
    p = producer(cfg, engines)
    lags = []
    try:
        for step in range(cfg.steps):
            out = p.take(step)
            expected = [f"train/{step}/{i}" for i in (1, 3)] + [f"train/{step}.1/{i}" for i in (0, 1)] if dynamic \
                else [f"train/{step}/{i}" for i in range(4)]
            assert [g.prompt.id for g in out.groups] == expected
            assert_whole(out.groups)
            lags += [step - g.version for g in out.groups]
            p.thread.submit(lambda: None).result()  # what is queued runs before the load
            engines.load(step + 1)
        assert p.produced() == {}  # nothing queued beyond the last step
    finally:
        p.close()
    assert min(lags) >= 0 and max(lags) == k


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
    from orchestration.train.loop import sample_rows

    out = sample(cfg_with())
    rows = sample_rows(out, 2)
    assert len(rows) == 2 * 4  # 2 prompts × G completions
    problem = out.problems[rows[0]["prompt_id"]]
    assert rows[0]["prompt"] == problem.prompt and rows[0]["answer"] == problem.answer
    assert [r["reward"] for r in rows[4:]] == [0.0, 1.0, 2.0, 3.0]  # the informative second prompt
    assert {r["policy_version"] for r in rows} == {0} and rows[0]["status"] == "ok"


def test_midway_evaluations_are_greedy_unless_asked():
    from orchestration.train.loop import eval_settings

    cfg = cfg_with()
    assert eval_settings(cfg).pass_k == 4 and eval_settings(cfg, midway=True).pass_k == 1
    cfg.eval.pass_k_midway = True
    assert eval_settings(cfg, midway=True).pass_k == 4
