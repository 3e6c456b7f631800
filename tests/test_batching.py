"""Tests for orchestration/train/batching.py, learner/batch.py and learner/objectives.py.

Expected values are computed by hand in each test (see the comments)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from actors.scoring import Score
from actors.types import Completion, Group, Prompt
from learner.batch import TrainBatch, micro_batches, pad
from learner.objectives import GRPOObjective, Micro, SFTObjective
from learner.batch import pad_to_multiple
from orchestration.train.batching import build_batch, overlong_shaping

GRPO = SimpleNamespace(advantage="grpo", scale_by_std=True)
DR_GRPO = SimpleNamespace(advantage="grpo", scale_by_std=False)
RLOO = SimpleNamespace(advantage="rloo", scale_by_std=True)


def approx(values, abs=1e-5):
    return pytest.approx(values, abs=abs)


def ok(r: float) -> Score:
    return Score(reward=r, parts={"x": r}, status="ok")


def failed() -> Score:
    return Score(reward=0.0, parts={}, status="failed", error="timeout after 5 s")


def make_groups(rewards_per_group: list[list]) -> tuple[list[Group], list[list[Score]]]:
    """Group p has prompt tokens [100+p]*(p+1); completion g of group p has tokens [10p+g]*(g+1)."""
    groups, scores = [], []
    for p, row in enumerate(rewards_per_group):
        comps = [Completion(token_ids=[10 * p + g] * (g + 1), logprobs=[-0.1 * (g + 1)] * (g + 1),
                            finish_reason="stop", text=f"c{p}{g}") for g in range(len(row))]
        groups.append(Group(Prompt(id=f"p{p}", content=f"q{p}"), [100 + p] * (p + 1), comps, version=0))
        scores.append([failed() if r is None else ok(r) for r in row])
    return groups, scores


# --------------------------------------------------------------------------- build_batch


def test_build_batch_grpo_two_groups():
    # group 0: [1, 0, .5]: mean .5, deviations [.5, -.5, 0], unbiased var .5/2 = .25, std .5 -> [1, -1, 0]
    # group 1: [2, 2, 5]: mean 3, deviations [-1, -1, 2], unbiased var 6/2 = 3 -> [-1, -1, 2] / sqrt(3)
    groups, scores = make_groups([[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]])
    batch, raw = build_batch(groups, scores, GRPO)
    s3 = math.sqrt(3)
    assert batch.advantages == approx([1.0, -1.0, 0.0, -1 / s3, -1 / s3, 2 / s3])
    assert batch.loss_weights == [1.0] * 6
    assert raw.shape == (2, 3)
    assert raw.tolist() == [[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]]
    # group-contiguous layout: prompt repeated per completion, completions in order
    assert batch.prompt_ids == [[100]] * 3 + [[101, 101]] * 3
    assert batch.completion_ids == [[0], [1, 1], [2, 2, 2], [10], [11, 11], [12, 12, 12]]
    assert batch.rollout_logprobs[2] == approx([-0.3] * 3)
    assert len(batch) == 6


def test_build_batch_dr_grpo_no_std():
    # Dr. GRPO: r - mean. group 0 [1, 0, .5] -> [.5, -.5, 0]; group 1 [2, 2, 5] -> [-1, -1, 2]
    groups, scores = make_groups([[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]])
    batch, _ = build_batch(groups, scores, DR_GRPO)
    assert batch.advantages == approx([0.5, -0.5, 0.0, -1.0, -1.0, 2.0])


def test_build_batch_rloo():
    # r_i - mean of the other two. group 0 [1, 0, .5]: 1-.25, 0-.75, .5-.5; group 1 [2, 2, 5]: 2-3.5, 2-3.5, 5-2
    groups, scores = make_groups([[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]])
    batch, _ = build_batch(groups, scores, RLOO)
    assert batch.advantages == approx([0.75, -0.75, 0.0, -1.5, -1.5, 3.0])


def test_build_batch_failed_sample_weight_zero_and_nan():
    # group 0 = [1, FAIL, 0, .5], group 1 = [2, 2, 5, 3] (no failure)
    groups, scores = make_groups([[1.0, None, 0.0, 0.5], [2.0, 2.0, 5.0, 3.0]])
    batch, raw = build_batch(groups, scores, GRPO)
    assert batch.loss_weights == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert math.isnan(raw[0, 1].item())
    assert torch.isnan(raw).sum().item() == 1
    assert raw[0, [0, 2, 3]].tolist() == [1.0, 0.0, 0.5]
    adv = batch.advantages
    assert all(math.isfinite(a) for a in adv)
    # The baseline of group 0 is the mean of its successful rewards only (.5), so the successful
    # advantages are centred on it: +x, -x, 0 (a baseline including the failed 0.0 would be .375).
    assert adv[0] == approx(-adv[2]) and adv[0] > 0
    assert adv[3] == approx(0.0)
    # group 1 is untouched by group 0's failure: [2, 2, 5, 3], mean 3, dev [-1, -1, 2, 0],
    # unbiased var 6/3 = 2 -> [-1, -1, 2, 0] / sqrt(2)
    s2 = math.sqrt(2)
    assert adv[4:] == approx([-1 / s2, -1 / s2, 2 / s2, 0.0])


def test_build_batch_failed_sample_excluded_from_baseline_dr_grpo():
    # Without std scaling the advantage is r - baseline: baseline = mean(1, 0, .5) = .5
    groups, scores = make_groups([[1.0, None, 0.0, 0.5], [2.0, 2.0, 5.0, 3.0]])
    batch, _ = build_batch(groups, scores, DR_GRPO)
    ok_adv = [batch.advantages[i] for i in (0, 2, 3)]
    assert ok_adv == approx([0.5, -0.5, 0.0])
    assert batch.advantages[4:] == approx([-1.0, -1.0, 2.0, 0.0])


def test_build_batch_failed_sample_excluded_from_std():
    # Excluding the failed sample, group 0 is [1, 0, .5]: mean .5, std .5 -> [1, -1, 0]
    groups, scores = make_groups([[1.0, None, 0.0, 0.5], [2.0, 2.0, 5.0, 3.0]])
    batch, _ = build_batch(groups, scores, GRPO)
    assert [batch.advantages[i] for i in (0, 2, 3)] == approx([1.0, -1.0, 0.0])


def test_build_batch_rloo_failed_sample_excluded_from_baseline():
    # Excluding the failed sample, group 0 is [1, 0, .5]; leave-one-out: 1-.25, 0-.75, .5-.5
    groups, scores = make_groups([[1.0, None, 0.0, 0.5], [2.0, 2.0, 5.0, 3.0]])
    batch, _ = build_batch(groups, scores, RLOO)
    assert [batch.advantages[i] for i in (0, 2, 3)] == approx([0.75, -0.75, 0.0])


@pytest.mark.parametrize("algo", [GRPO, DR_GRPO, RLOO], ids=["grpo", "dr_grpo", "rloo"])
def test_build_batch_all_failed_group(algo):
    groups, scores = make_groups([[None, None, None], [1.0, 0.0, 0.5]])
    batch, raw = build_batch(groups, scores, algo)
    assert batch.loss_weights == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert batch.advantages[:3] == [0.0, 0.0, 0.0]
    assert all(math.isfinite(a) for a in batch.advantages)
    assert torch.isnan(raw[0]).all() and not torch.isnan(raw[1]).any()
    expected = {"grpo": [1.0, -1.0, 0.0], "dr_grpo": [0.5, -0.5, 0.0], "rloo": [0.75, -0.75, 0.0]}
    key = "rloo" if algo is RLOO else ("grpo" if algo.scale_by_std else "dr_grpo")
    assert batch.advantages[3:] == approx(expected[key])


def test_build_batch_single_success_gets_zero_advantage():
    # only one sample scored: nothing to compare it with, so its advantage is 0
    groups, scores = make_groups([[None, 3.0, None]])
    batch, _ = build_batch(groups, scores, GRPO)
    assert batch.loss_weights == [0.0, 1.0, 0.0]
    assert batch.advantages == approx([0.0, 0.0, 0.0])


# --------------------------------------------------------------------------- overlong shaping


def _trajectory(mask: list[int]) -> Completion:
    """A multi-turn trajectory: policy tokens 5 where the mask is 1, observation tokens 9 elsewhere."""
    return Completion(token_ids=[5 if m else 9 for m in mask], logprobs=[-0.5 if m else 0.0 for m in mask],
                      finish_reason="stop", text="t", mask=mask, turns=[], info={})


def _shaping(completions, max_tokens=8, buffer=4, factor=0.5):
    return overlong_shaping([Group(Prompt("p", "q"), [1], completions, 0)], max_tokens, buffer, factor)


def test_overlong_shaping_of_single_replies_is_unchanged():
    # max 8, buffer 4: free up to 4 tokens, then −(L − 4)/4 × 0.5, −0.5 from 8 on: every token counts
    lengths = [3, 4, 5, 6, 7, 8, 12]
    plain = [Completion([5] * n, [-0.5] * n, "stop", "t") for n in lengths]  # mask None
    ones = [_trajectory([1] * n) for n in lengths]  # a multi-turn completion of one reply: all ones
    assert _shaping(plain).tolist() == [approx([0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5])]
    assert _shaping(ones).tolist() == _shaping(plain).tolist()
    assert _shaping(plain, buffer=0).tolist() == [[0.0] * 7]
    groups, _ = make_groups([[0.0] * 4, [0.0] * 4])  # completion g has g + 1 tokens
    assert overlong_shaping(groups, 3, 2, 1.0).tolist() == [approx([0.0, -0.5, -1.0, -1.0])] * 2


def test_overlong_shaping_of_trajectories_counts_the_policys_longest_reply():
    long_tool = [1, 1] + [0] * 20 + [1, 1, 1]  # 25 tokens, replies of 2 and 3: far from the limit
    many_turns = ([1, 1, 1] + [0, 0]) * 4  # 4 replies of 3 (12 policy tokens): no reply near the limit
    near = [1, 1] + [0] * 3 + [1] * 7  # a reply of 7: in the buffer
    at_limit = [1] * 8 + [0] * 3 + [1]  # a first reply cut at the limit
    masks = (long_tool, many_turns, near, at_limit)
    assert _shaping([_trajectory(m) for m in masks]).tolist() == [approx([0.0, 0.0, -(7 - 4) / 4 * 0.5, -0.5])]
    # counting every token after the prompt instead would punish all four in full
    every_token = [Completion([5] * len(m), [0.0] * len(m), "stop", "t") for m in masks]
    assert _shaping(every_token).tolist() == [[-0.5] * 4]


def test_overlong_shaping_mixes_single_replies_and_trajectories():
    groups = [Group(Prompt("a", "q"), [1], [Completion([5] * 6, [0.0] * 6, "stop", "t"),
                                            _trajectory([1] * 2 + [0] * 9)], 0),
              Group(Prompt("b", "q"), [1], [_trajectory([1] * 3 + [0] * 2 + [1] * 6),
                                            Completion([5] * 2, [0.0] * 2, "stop", "t")], 0)]
    assert overlong_shaping(groups, 8, 4, 1.0).tolist() == [approx([-0.5, 0.0]), approx([-0.5, 0.0])]


# --------------------------------------------------------------------------- pad_to_multiple


def _batch(n: int) -> TrainBatch:
    return TrainBatch(prompt_ids=[[1, i] for i in range(n)], completion_ids=[[i] * (i + 1) for i in range(n)],
                      rollout_logprobs=[[-1.0] * (i + 1) for i in range(n)], advantages=[float(i) for i in range(n)],
                      loss_weights=[1.0] * n)


def test_pad_to_multiple_adds_zero_weight_copies():
    b = _batch(5)
    padded, extra = pad_to_multiple(b, 4)
    assert extra == 3 and len(padded) == 8
    assert padded.loss_weights == [1.0] * 5 + [0.0] * 3
    assert padded.completion_ids[5:] == [[4] * 5] * 3  # copies of the last sequence
    assert padded.advantages == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0]
    assert b.loss_weights == [1.0] * 5 and len(b) == 5  # the input is not modified


def test_pad_to_multiple_noop():
    b = _batch(6)
    padded, extra = pad_to_multiple(b, 3)
    assert extra == 0 and len(padded) == 6
    assert padded.loss_weights == [1.0] * 6


# --------------------------------------------------------------------------- TrainBatch


def test_select_and_shard():
    b = _batch(6)
    s = b.select([4, 0, 4])
    assert s.prompt_ids == [[1, 4], [1, 0], [1, 4]]
    assert s.advantages == [4.0, 0.0, 4.0]
    assert s.completion_ids == [[4] * 5, [0], [4] * 5]
    assert b.shard(0, 3).advantages == [0.0, 1.0]
    assert b.shard(1, 3).advantages == [2.0, 3.0]
    assert b.shard(2, 3).completion_ids == [[4] * 5, [5] * 6]
    assert b.shard(0, 1).advantages == b.advantages
    assert b.lengths() == [3, 4, 5, 6, 7, 8]


# --------------------------------------------------------------------------- pad


PAD_ID = 0


def _ragged() -> TrainBatch:
    return TrainBatch(
        prompt_ids=[[11, 12, 13], [21], [31, 32], [41, 42, 43, 44], [51, 52]],
        completion_ids=[[14, 15], [22, 23, 24, 25], [33, 34, 35], [45], []],
        rollout_logprobs=[[-0.14, -0.15], [-0.22, -0.23, -0.24, -0.25], [-0.33, -0.34, -0.35], [-0.45], []],
        advantages=[1.0, -1.0, 0.5, 2.0, 0.0],
        loss_weights=[1.0, 1.0, 0.0, 1.0, 1.0],
    )


def test_pad_shapes_and_inputs():
    b = _ragged()
    p = pad(b, PAD_ID, "cpu")
    # longest = 5 (rows 0, 1, 3); earliest completion starts at position 1 -> start = 0
    assert p.start == 0
    assert p.input_ids.shape == (5, 5) and p.attention_mask.shape == (5, 5)
    assert p.targets.shape == (5, 5) and p.mask.shape == (5, 5) and p.rollout_logprobs.shape == (5, 5)
    assert p.input_ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25], [31, 32, 33, 34, 35],
                                    [41, 42, 43, 44, 45], [51, 52, 0, 0, 0]]
    assert p.attention_mask.tolist() == [[1] * 5, [1] * 5, [1] * 5, [1] * 5, [1, 1, 0, 0, 0]]
    assert p.advantages.tolist() == [1.0, -1.0, 0.5, 2.0, 0.0]


def test_pad_targets_align_with_completions():
    b = _ragged()
    p = pad(b, PAD_ID, "cpu")
    for i, (c, lp, w) in enumerate(zip(b.completion_ids, b.rollout_logprobs, b.loss_weights)):
        on = p.mask[i] == 1
        if w > 0:
            assert p.targets[i][on].tolist() == c  # exactly the completion tokens, in order
            assert p.rollout_logprobs[i][on].tolist() == approx(lp)
            assert int(on.sum()) == len(c)  # prompt and padding positions are masked out
        else:
            assert int(on.sum()) == 0  # a loss-weight-0 row is fully masked
        # position t of the window scores input token start + t + 1
        lo = len(b.prompt_ids[i]) - 1 - p.start
        assert p.targets[i, lo:lo + len(c)].tolist() == c
        assert p.input_ids[i, p.start + lo + 1: p.start + lo + 1 + len(c)].tolist() == c
    assert set(p.mask.unique().tolist()) <= {0.0, 1.0}
    # logprobs of the weight-0 row are still placed (they are zero only outside completions)
    assert p.rollout_logprobs[2, 1:4].tolist() == approx([-0.33, -0.34, -0.35])
    assert p.rollout_logprobs[4].tolist() == [0.0] * 5


def test_pad_window_starts_at_earliest_completion():
    # prompts of 4 and 3 tokens: start = 3 - 1 = 2; T = L - start = 6 - 2 = 4
    b = TrainBatch(prompt_ids=[[1, 2, 3, 4], [5, 6, 7]], completion_ids=[[8, 9], [10, 11, 12]],
                   rollout_logprobs=[[-1.0, -2.0], [-3.0, -4.0, -5.0]], advantages=[1.0, 2.0],
                   loss_weights=[1.0, 1.0])
    p = pad(b, 99, "cpu")
    assert p.start == 2
    assert p.targets.shape == (2, 4)
    assert p.mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 0]]
    assert p.targets[0, 1:3].tolist() == [8, 9]
    assert p.targets[1, 0:3].tolist() == [10, 11, 12]
    assert p.rollout_logprobs.tolist() == [[0.0, -1.0, -2.0, 0.0], [-3.0, -4.0, -5.0, 0.0]]
    assert p.input_ids[1].tolist() == [5, 6, 7, 10, 11, 12]
    assert p.input_ids[0].tolist() == [1, 2, 3, 4, 8, 9]


# --------------------------------------------------------------------------- micro_batches


def test_micro_batches_exact_split():
    # sorted longest first: 8(i2) 7(i4) 5(i0) 3(i1) 2(i3) 1(i5); budget 16:
    # [2,4] = 2*8 = 16; +0 would be 3*8 > 16 -> [0,1,3] = 3*5 = 15; +5 would be 4*5 > 16 -> [5]
    assert micro_batches([5, 3, 8, 2, 7, 1], 16) == [[2, 4], [0, 1, 3], [5]]


@pytest.mark.parametrize("budget", [8, 10, 16, 25, 100])
def test_micro_batches_properties(budget):
    g = torch.Generator().manual_seed(budget)
    lengths = torch.randint(1, 9, (23,), generator=g).tolist()
    mbs = micro_batches(lengths, budget)
    flat = sorted(i for mb in mbs for i in mb)
    assert flat == list(range(len(lengths)))  # every index exactly once
    for mb in mbs:
        assert mb, "no empty micro-batch without count"
        assert len(mb) * max(lengths[i] for i in mb) <= budget


def test_micro_batches_oversized_sequence_alone():
    mbs = micro_batches([20, 3, 4], 10)
    assert mbs == [[0], [2, 1]]


def test_micro_batches_count():
    mbs = micro_batches([4, 4, 4], 8, count=4)
    assert mbs == [[0, 1], [2], [], []]
    assert micro_batches([4, 4, 4], 8, count=2) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="2 micro-batches needed, 1 allowed"):
        micro_batches([4, 4, 4], 8, count=1)
    assert micro_batches([], 8, count=2) == [[], []]


# --------------------------------------------------------------------------- objectives


def _micro(logp, old, mask, adv, ref=None):
    mask = torch.tensor(mask, dtype=torch.float32)
    return Micro(logp=logp, old_logp=old, mask=mask, advantages=torch.tensor(adv), entropy=None, ref_logp=ref,
                 num_tokens=int(mask.sum()), num_seqs=mask.shape[0])


LOGP = [[-0.5, -1.0, -7.0], [-0.2, -0.3, -0.4]]
MASK = [[1, 1, 0], [1, 1, 1]]
ADV = [1.0, -0.5]


def test_grpo_objective_on_policy_token_mean():
    logp = torch.tensor(LOGP, requires_grad=True)
    mb = _micro(logp, logp.detach().clone(), MASK, ADV)
    loss, metrics = GRPOObjective(agg="token_mean")(mb)
    # ratio = 1 everywhere -> per-token loss = -A; token mean over 5 tokens: -(2*1 + 3*(-.5)) / 5 = -0.1
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["clip_frac_low"].item() == 0.0 and metrics["clip_frac_high"].item() == 0.0
    assert "kl_ref" not in metrics
    loss.backward()
    # d loss / d logp = -A_i / 5 on valid tokens (ratio 1), 0 on the masked one
    assert torch.allclose(logp.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.1, 0.1, 0.1]]), atol=1e-6)


def test_grpo_objective_on_policy_seq_mean_token_mean():
    logp = torch.tensor(LOGP)
    mb = _micro(logp, logp.clone(), MASK, ADV)
    loss, _ = GRPOObjective(agg="seq_mean_token_mean")(mb)
    # per-sequence token means: -1 and +0.5; mean over 2 sequences = -0.25
    assert loss.item() == pytest.approx(-0.25, abs=1e-6)


def test_grpo_objective_kl_reference():
    logp = torch.tensor(LOGP)
    obj = GRPOObjective(agg="token_mean", kl_coef=0.1, kl_estimator="k3")
    assert obj.needs_reference
    same, m_same = obj(_micro(logp, logp.clone(), MASK, ADV, ref=logp.clone()))
    assert same.item() == pytest.approx(-0.1, abs=1e-6)  # KL to an identical reference is 0
    assert m_same["kl_ref"].item() == pytest.approx(0.0, abs=1e-7)
    ref = logp + 0.5  # d = ref - logp = .5 on every token: k3 = e^.5 - .5 - 1
    k3 = math.exp(0.5) - 1.5
    diff, m_diff = obj(_micro(logp, logp.clone(), MASK, ADV, ref=ref))
    assert m_diff["kl_ref"].item() == pytest.approx(k3, abs=1e-6)
    assert diff.item() == pytest.approx(-0.1 + 0.1 * k3, abs=1e-6)
    assert diff.item() > same.item()
    assert not GRPOObjective(kl_coef=0.0).needs_reference


def test_grpo_objective_off_policy_modes():
    logp = torch.tensor(LOGP, requires_grad=True)
    engine = logp.detach() - torch.tensor([[0.5, -0.1, 0.0], [0.0, 0.2, 3.0]])  # weights e^.5, e^-.1, 1, 1, e^.2, e^3

    def run(**kw):
        logp.grad = None
        mb = _micro(logp, logp.detach().clone(), MASK, ADV)
        mb.engine_logp = engine
        loss, metrics = GRPOObjective(agg="token_mean", is_cap=2.0, **kw)(mb)
        loss.backward()
        return loss.item(), logp.grad.clone(), metrics

    plain_loss, plain_grad, _ = run()  # the synchronous loop: engine logprobs only logged
    mb = _micro(logp, logp.detach().clone(), MASK, ADV)
    base_loss, _ = GRPOObjective(agg="token_mean")(mb)
    assert plain_loss == base_loss.item()  # bitwise: max_staleness=0 trains exactly as before
    loss, grad, metrics = run(off_policy="learner")
    w = torch.tensor([[math.exp(0.5), math.exp(-0.1), 1.0], [1.0, math.exp(0.2), 2.0]])  # e^3 capped at 2
    assert torch.allclose(grad, plain_grad * w, atol=1e-6)  # each token's gradient × its truncated weight
    assert metrics["is_clipped_frac"].item() == pytest.approx(1 / 5)  # 5 valid tokens, the e^3 one capped
    assert metrics["is_weight_max"].item() == pytest.approx(2.0)
    _, grad, metrics = run(off_policy="engine")  # ratio against the engine's logprobs, no weights
    assert metrics["ratio_mean"].item() != pytest.approx(1.0)


def test_sft_objective_mean_nll():
    logp = torch.tensor(LOGP, requires_grad=True)
    mb = _micro(logp, logp.detach().clone(), MASK, ADV)
    loss, metrics = SFTObjective()(mb)
    # masked tokens: .5 + 1.0 + .2 + .3 + .4 = 2.4 over 5 tokens (the -7.0 padding is ignored)
    assert loss.item() == pytest.approx(0.48, abs=1e-6)
    assert metrics["nll"].item() == pytest.approx(0.48, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.2, -0.2, 0.0], [-0.2, -0.2, -0.2]]), atol=1e-6)


def test_entropy_bonus_lowers_the_loss_by_its_coefficient_times_the_entropy():
    """The bonus rewards entropy: loss(c) = loss(0) - c * mean entropy (token_mean), and its gradient
    raises the entropy (a flipped sign would punish exploration)."""
    logp = torch.tensor(LOGP)
    entropy = torch.tensor([[0.5, 1.5, 9.0], [1.0, 2.0, 3.0]], requires_grad=True)  # 9.0 is masked
    mb = _micro(logp, logp.clone(), MASK, ADV)
    mb.entropy = entropy
    plain, _ = GRPOObjective(agg="token_mean")(mb)
    bonus, _ = GRPOObjective(agg="token_mean", entropy_coef=0.1)(mb)
    assert bonus.item() == pytest.approx(plain.item() - 0.1 * (0.5 + 1.5 + 1.0 + 2.0 + 3.0) / 5, abs=1e-6)
    bonus.backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.02, -0.02, 0.0], [-0.02, -0.02, -0.02]]), atol=1e-7)
