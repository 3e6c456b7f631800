"""Tests for learner/grpo.py. Expected values are computed by hand in each test."""

import math

import pytest
import torch

from learner.grpo import (
    aggregate_loss,
    group_advantages,
    gspo_loss,
    informative_groups,
    kl_penalty,
    longest_reply,
    masked_mean,
    overlong_penalty,
    policy_loss,
    rloo_advantages,
    truncated_is_weights,
)

F64 = torch.float64


def close(a, b, atol=1e-6):
    b = torch.as_tensor(b, dtype=a.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=0), (a, b)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_group_of_two():
    # group [1,0]: mean .5, unbiased std sqrt((.25+.25)/1) = sqrt(.5); adv = ±.5/sqrt(.5) = ±sqrt(.5)
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    s = math.sqrt(0.5)
    close(a, [s, -s, -s, s], atol=1e-5)


def test_group_advantages_zero_variance_and_unbiased_std():
    # group 1 all equal -> zeros. group 2 [0,0,1]: mean 1/3, deviations [-1/3,-1/3,2/3],
    # unbiased var = (1/9+1/9+4/9)/(3-1) = 1/3 -> std = 1/sqrt(3)
    # (biased std would be sqrt(2/9) and give -0.7071 for the first element).
    a = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0]), 3)
    std = 1 / math.sqrt(3)
    close(a, [0, 0, 0, (-1 / 3) / std, (-1 / 3) / std, (2 / 3) / std], atol=1e-5)
    assert torch.all(torch.isfinite(a))


def test_group_advantages_no_std_scaling():
    # Dr. GRPO: r - mean. [3,1] mean 2 -> [1,-1]; [2,2] -> [0,0]; [5,0] mean 2.5 -> [2.5,-2.5]
    a = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 0.0]), 2, scale_by_std=False)
    close(a, [1, -1, 0, 0, 2.5, -2.5])


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages, informative_groups])
def test_group_size_errors(fn):
    with pytest.raises(ValueError):
        fn(torch.zeros(5), 2)  # 5 not divisible by 2
    with pytest.raises(ValueError):
        fn(torch.zeros(4), 1)  # group of one


def test_rloo_advantages():
    # group [1,0,0,0]: 1 - 0 = 1; each 0: 0 - 1/3.
    # group [4,2,0,2]: 4-(2+0+2)/3 = 8/3; 2-(4+0+2)/3 = 0; 0-(4+2+2)/3 = -8/3; 2-(4+2+0)/3 = 0
    a = rloo_advantages(torch.tensor([1.0, 0, 0, 0, 4, 2, 0, 2]), 4)
    close(a, [1, -1 / 3, -1 / 3, -1 / 3, 8 / 3, 0, -8 / 3, 0])
    # group of two: [3,1] -> [3-1, 1-3]
    close(rloo_advantages(torch.tensor([3.0, 1.0]), 2), [2, -2])


# --------------------------------------------------------------------------- KL


def test_kl_kinds():
    logp = torch.tensor([[0.0, -1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.0, -1.0, 0.0]], dtype=F64)
    close(kl_penalty(logp, ref, "k1"), [[1.0, 0.0, -2.0]])  # logp - ref
    close(kl_penalty(logp, ref, "k2"), [[0.5, 0.0, 2.0]])  # 0.5*(logp-ref)^2
    # k3 with d = ref - logp = [-1, 0, 2]: exp(d) - d - 1
    close(kl_penalty(logp, ref, "k3"), [[math.exp(-1) + 1 - 1, 0.0, math.exp(2) - 2 - 1]])
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(logp, logp, "k3") == 0)


# --------------------------------------------------------------------------- aggregation

LOSS = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
MASK = torch.tensor([[1.0, 1, 0], [1, 0, 0], [0, 0, 0]])  # row 2 fully masked


def test_aggregate_token_mean():
    close(aggregate_loss(LOSS, MASK, "token_mean"), (1 + 2 + 4) / 3)
    close(aggregate_loss(LOSS, MASK.bool(), "token_mean"), (1 + 2 + 4) / 3)
    close(aggregate_loss(LOSS, MASK, "token_mean", num_tokens=10), (1 + 2 + 4) / 10)


def test_aggregate_seq_mean_token_mean():
    # row means: (1+2)/2 = 1.5, 4/1 = 4, fully masked row -> 0 but still counted: /3
    close(aggregate_loss(LOSS, MASK, "seq_mean_token_mean"), (1.5 + 4 + 0) / 3)
    close(aggregate_loss(LOSS, MASK, "seq_mean_token_mean", num_seqs=5), (1.5 + 4) / 5)


def test_aggregate_seq_mean_token_sum_norm():
    close(aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm", max_tokens=4), (1 + 2 + 4) / (3 * 4))
    close(aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm", max_tokens=4, num_seqs=6), 7 / 24)
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError):
        aggregate_loss(LOSS, MASK, "seq_sum")


def test_aggregate_seq_of_length_one():
    loss, mask = torch.tensor([[5.0, 100.0]]), torch.tensor([[1.0, 0.0]])
    close(aggregate_loss(loss, mask, "token_mean"), 5.0)
    close(aggregate_loss(loss, mask, "seq_mean_token_mean"), 5.0)
    close(aggregate_loss(loss, mask, "seq_mean_token_sum_norm", max_tokens=2), 5.0 / 2)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_all_masked_is_zero_not_nan(mode):
    out = aggregate_loss(torch.full((2, 3), float("nan")), torch.zeros(2, 3), mode, max_tokens=3)
    assert out.item() == 0.0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("splits", [[3, 3], [2, 1, 3]])
def test_aggregate_microbatch_identity(mode, splits):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 5, generator=g, dtype=F64)
    lengths = torch.tensor([5, 1, 3, 0, 2, 4])  # varied lengths incl. a fully masked row
    mask = (torch.arange(5)[None, :] < lengths[:, None]).to(F64)
    full = aggregate_loss(loss, mask, mode, max_tokens=5)
    n_tok, n_seq = int(mask.sum()), loss.shape[0]
    total, start = torch.zeros((), dtype=F64), 0
    for size in splits:
        sl = slice(start, start + size)
        total = total + aggregate_loss(loss[sl], mask[sl], mode, max_tokens=5, num_tokens=n_tok, num_seqs=n_seq)
        start += size
    close(total, full.item(), atol=1e-12)
    # without global denominators the identity does not hold (the test can fail)
    local = sum(aggregate_loss(loss[s:s + 3], mask[s:s + 3], mode, max_tokens=5) for s in (0, 3))
    assert not torch.allclose(local, full)


def test_masked_mean():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_mean(x, m), 2.0)
    close(masked_mean(x, m, dim=-1), [2.0, 0.0])


# --------------------------------------------------------------------------- PPO / GRPO surrogate


def test_policy_loss_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    loss, m = policy_loss(logp, logp.detach().clone(), torch.tensor([1.0, -2.0]), mask)
    # ratio 1 everywhere: loss = -mean_tokens(A) = -(1*3 + (-2)*2) / 5 = 0.2
    close(loss, 0.2)
    assert set(m) == {"clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean"}
    close(m["clip_frac_low"], 0.0)
    close(m["clip_frac_high"], 0.0)
    close(m["approx_kl"], 0.0)
    close(m["ratio_mean"], 1.0)
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad and v.is_floating_point()


RATIOS = [0.5, 0.8, 1.0, 1.25, 1.28, 1.5]  # 0.8 and 1.28 are the edges for clip_low=.2, clip_high=.28


def test_policy_loss_clip_values_and_grads():
    ratio = torch.tensor([RATIOS, RATIOS], dtype=F64)
    logp = torch.log(ratio).requires_grad_(True)
    old = torch.zeros_like(ratio)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones_like(ratio)
    # A=+1: -min(r, clip(r,.8,1.28)) -> only the high clip bites (1.5 -> 1.28); 1.25 is
    #       inside thanks to clip-higher (it would be clipped at a symmetric 1.2).
    # A=-1:  max(r, clip(r)) -> only the low clip bites (0.5 -> 0.8).
    expected = [[-0.5, -0.8, -1.0, -1.25, -1.28, -1.28],
                [0.8, 0.8, 1.0, 1.25, 1.28, 1.5]]
    for i in range(2):
        for j in range(6):
            one = torch.zeros_like(mask)
            one[i, j] = 1
            l_ij, _ = policy_loss(logp, old, adv, one, clip_low=0.2, clip_high=0.28)
            assert abs(l_ij.item() - expected[i][j]) < 1e-9, (i, j, l_ij.item())
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(loss, (-(0.5 + 0.8 + 1.0 + 1.25 + 1.28 + 1.28) + (0.8 + 0.8 + 1.0 + 1.25 + 1.28 + 1.5)) / 12)
    loss.backward()
    # unclipped token: d(-A*r)/dlogp = -A*r, divided by 12 tokens; clipped: 0. (edges not asserted)
    g = logp.grad
    for j in (0, 2, 3):
        close(g[0, j], -RATIOS[j] / 12, atol=1e-12)
    close(g[0, 5], 0.0)  # A>0, ratio 1.5 beyond high clip
    for j in (2, 3, 5):
        close(g[1, j], RATIOS[j] / 12, atol=1e-12)  # A<0, ratio 1.5 not clipped (pessimism)
    close(g[1, 0], 0.0)  # A<0, ratio 0.5 beyond low clip


def test_policy_loss_clip_fracs_and_kl():
    r = [0.5, 1.0, 1.25, 1.5]  # no tokens exactly on an edge (edge membership is ±1 ulp)
    ratio = torch.tensor([r, r], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    _, m = policy_loss(torch.log(ratio), torch.zeros_like(ratio), adv, torch.ones_like(ratio),
                       clip_low=0.2, clip_high=0.28)
    close(m["clip_frac_high"], 1 / 8)  # only (A>0, 1.5); (A<0, 1.5) is not clipped
    close(m["clip_frac_low"], 1 / 8)  # only (A<0, 0.5); (A>0, 0.5) is not clipped
    # k3(old vs new) = exp(old-logp) - (old-logp) - 1 = 1/r + log r - 1
    k3 = [1 / x + math.log(x) - 1 for x in r]
    close(m["approx_kl"], sum(k3) / 4, atol=1e-6)
    close(m["ratio_mean"], sum(r) / 4)


def test_policy_loss_inf_padding_is_harmless():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, float("-inf")]])
    loss, m = policy_loss(logp, old, torch.tensor([2.0]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    close(loss, -2.0)
    assert torch.all(torch.isfinite(logp.grad)) and all(torch.isfinite(v) for v in m.values())


# --------------------------------------------------------------------------- GSPO


def _gspo_batch():
    # row 0: log-ratios [0.1, 0.3] (+ masked garbage) -> s0 = exp(0.2)  inside [0.8, 1.3]
    # row 1: log-ratio [-0.4] only                    -> s1 = exp(-0.4) = 0.670 < 0.8, A<0: clipped
    # row 2: fully masked, -inf padding
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    lr = torch.tensor([[0.1, 0.3, 50.0], [-0.4, 7.0, 7.0], [0.0, 0.0, 0.0]], dtype=F64)
    logp = old + lr
    logp[2] = float("-inf")
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=F64)
    return logp.requires_grad_(True), old, mask


def test_gspo_value_clip_and_per_token_grad():
    logp, old, mask = _gspo_batch()
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    loss, m = gspo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3)
    s0 = math.exp((0.1 + 0.3) / 2)
    # per-token losses: row 0 -s0 (both tokens), row 1 max(s1, 0.8) = 0.8; seq_mean_token_mean over 3 rows
    close(loss, (-s0 + 0.8 + 0.0) / 3, atol=1e-12)
    loss.backward()
    # d/dlogp_t of (1/3)*(1/2)*sum_t(-A*s_tok) = -s0/6 for each valid token of row 0
    close(logp.grad[0], [-s0 / 6, -s0 / 6, 0.0], atol=1e-12)
    close(logp.grad[1], [0.0, 0.0, 0.0])  # sequence clipped -> no gradient
    close(logp.grad[2], [0.0, 0.0, 0.0])  # fully masked row: zero, not NaN
    assert torch.isfinite(loss)
    close(m["clip_frac_low"], 1 / 2)  # one of the two non-empty sequences
    close(m["clip_frac_high"], 0.0)
    # ratio_mean: masked token mean of s_tok = (s0 + s0 + s1) / 3
    close(m["ratio_mean"], (2 * s0 + math.exp(-0.4)) / 3)


def test_gspo_high_clip_and_negative_advantage():
    old = torch.zeros(2, 2, dtype=F64)
    logp = torch.full((2, 2), 0.5, dtype=F64, requires_grad=True)  # s = exp(0.5) = 1.6487 for both rows
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    loss, m = gspo_loss(logp, old, adv, torch.ones(2, 2, dtype=F64), clip_low=0.2, clip_high=0.3)
    s = math.exp(0.5)
    # A>0: -min(s, 1.3) = -1.3 (clipped); A<0: max(s, 1.3) = s (unclipped)
    close(loss, (-1.3 + s) / 2, atol=1e-12)
    loss.backward()
    close(logp.grad[0], [0.0, 0.0])
    close(logp.grad[1], [s / 4, s / 4], atol=1e-12)  # (1/2 rows)*(1/2 tokens)*s
    close(m["clip_frac_high"], 1 / 2)
    close(m["clip_frac_low"], 0.0)


def test_gspo_token_mean_agg():
    logp, old, mask = _gspo_batch()
    adv = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    loss, _ = gspo_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, agg="token_mean")
    s0 = math.exp(0.2)
    close(loss, (-2 * s0 + 0.8) / 3, atol=1e-12)  # 3 valid tokens


# --------------------------------------------------------------------------- DAPO extras


def test_overlong_penalty():
    # max_len 20, buffer 4 -> free up to 16, linear to -1 at 20, -1 beyond
    L = torch.tensor([10, 16, 17, 18, 20, 25])
    close(overlong_penalty(L, 20, 4), [0.0, 0.0, (16 - 17) / 4, (16 - 18) / 4, -1.0, -1.0])


def test_longest_reply_is_the_longest_run_of_policy_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0],  # one reply of 4, right-padded
                         [1, 0, 0, 1, 1, 1],  # replies of 1 and 3: the last one is the longest
                         [1, 1, 0, 1, 1, 0],  # two replies of 2
                         [0, 0, 0, 0, 0, 0],  # no policy token
                         [1, 1, 1, 1, 1, 1]])  # a whole single reply
    close(longest_reply(mask), [4.0, 3.0, 2.0, 0.0, 6.0])
    close(longest_reply(mask.bool()), [4.0, 3.0, 2.0, 0.0, 6.0])
    close(longest_reply(torch.zeros(2, 0)), [0.0, 0.0])


def test_informative_groups():
    out = informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    assert out.dtype == torch.bool and out.tolist() == [False, True, False]
    assert informative_groups(torch.tensor([1, 1, 1, 0, 1, 0]), 3).tolist() == [False, True]


def test_truncated_is_weights_values_cap_and_stats():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]], dtype=F64))
    engine = torch.log(torch.tensor([[0.25, 0.4, 0.1]], dtype=F64))  # raw ratios 2, 0.5, 9
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w, m = truncated_is_weights(old, engine, mask, cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 1.0]], dtype=w.dtype))  # capped; 1 where masked
    assert m["is_weight_mean"].item() == pytest.approx(1.0)
    assert m["is_weight_max"].item() == pytest.approx(1.5)
    assert m["is_clipped_frac"].item() == pytest.approx(0.5)
    w, m = truncated_is_weights(old, engine, mask, cap=0)  # no truncation
    assert w[0, 0].item() == pytest.approx(2.0) and m["is_clipped_frac"].item() == 0.0


def test_token_weights_scale_each_tokens_loss_and_gradient():
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    adv, mask = torch.tensor([1.0], dtype=F64), torch.ones(1, 2)
    weights = torch.tensor([[0.5, 2.0]], dtype=F64)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, agg="token_mean", token_weights=weights)
    loss.backward()
    # ratio 1: per-token loss -A, gradient -A/T per token, each scaled by its weight
    assert loss.item() == pytest.approx(-(0.5 + 2.0) / 2)
    assert logp.grad[0].tolist() == pytest.approx([-0.25, -1.0])
