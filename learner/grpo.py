"""
GRPO objective: advantages, KL estimators, PPO/GSPO surrogates, loss aggregation.

Pure tensor functions (no Ray, no config, no I/O). The algorithm is GRPO as in
DeepSeekMath / DeepSeek-R1, with switches for the well-known variants:

Layout
    Batches are group-contiguous: the G completions of one prompt are adjacent,
    so B = P*G and `x.view(P, G)` recovers the groups. Token tensors are [B, T];
    `mask` [B, T] (bool or float) is 1 on valid completion tokens, 0 on prompt
    and padding. Masked positions never contribute (we use `torch.where`, not a
    multiply, so inf/NaN in padding cannot leak into values or gradients).

Advantages (one scalar per sequence, broadcast over its tokens)
    GRPO:      A_i = (r_i - mean_g r) / (std_g r + eps), unbiased std.
    Dr. GRPO:  A_i =  r_i - mean_g r  (no std scaling; scale_by_std=False).
    RLOO:      A_i =  r_i - mean_{j!=i} r_j  =  G/(G-1) * (r_i - mean_g r).
    A zero-variance group gets all-zero advantages (it carries no signal).

KL estimators of KL(pi || ref) per token, with d = ref_logp - logp (Schulman):
    k1 = -d = logp - ref,   k2 = 0.5 * d^2,   k3 = exp(d) - d - 1  (>= 0).

Surrogates (per token, ratio rho = exp(logp - old_logp))
    PPO / GRPO:  l = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A).
                 eps_low != eps_high is DAPO's "clip-higher".
    GSPO (Zheng et al. 2025): sequence ratio s_i = exp(mean_t(logp - old_logp))
                 over the valid tokens, in its token form
                 s_it = sg[s_i] * exp(logp_t - sg[logp_t]) (value s_i, gradient
                 s_i * grad logp_t per token); l = max(-A*s_it, -A*clip(s_it)).
                 Clipping is therefore per sequence.

Aggregation of per-token losses l [B, T] into a scalar
    token_mean               sum(l*m) / sum(m)                (DAPO token-level)
    seq_mean_token_mean      (1/B) sum_i sum_t(l*m)_i / |y_i|  (original GRPO)
    seq_mean_token_sum_norm  sum(l*m) / (B * max_tokens)       (Dr. GRPO)
    Optional global denominators (num_tokens for token_mean, num_seqs for the
    seq modes) replace the local ones, so summing micro-batch losses (and DP
    ranks) reproduces the full-batch loss exactly. Denominators clamp to >= 1.

Off-policy correction (asynchronous rollouts, rollout.max_staleness > 0)
    Completions come from an engine policy mu that may lag the learner's
    pi_old (the weights before this step's update). The ratio stays
    pi/pi_old, and each token's loss is multiplied by the truncated importance
    weight w = min(exp(logp_old - logp_mu), cap) (TIS, as verl and NeMo-RL).

DAPO extras: soft overlong punishment (a length-dependent reward term; for a
multi-turn trajectory the length of its longest reply, `longest_reply`) and
dynamic sampling (keep only groups whose rewards are not all equal).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from learner.algos import KL_ESTIMATORS as KL_KINDS
from learner.algos import LOSS_AGGREGATIONS as AGG_MODES

# ---------------------------------------------------------------------------
# helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of x over positions where mask is nonzero.

    x, mask: same shape (e.g. [B, T]). dim=None -> 0-dim tensor; dim=k -> the
    shape of x with dim k removed. An empty selection gives 0 (denominator
    clamped to 1), never NaN.
    """
    m = mask.bool()
    masked = torch.where(m, x, torch.zeros_like(x))
    num, den = (masked.sum(), m.sum()) if dim is None else (masked.sum(dim), m.sum(dim))
    return num / den.clamp(min=1).to(num.dtype)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [P, G]; ValueError on group_size < 2 or B % group_size != 0."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Keep floating dtypes (e.g. float64); promote ints/bools to float32."""
    return x if x.is_floating_point() else x.float()


def _denom(value, like: torch.Tensor) -> torch.Tensor:
    """A positive scalar denominator as a tensor of like's dtype/device (>= 1)."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clamp(min=1)


# ---------------------------------------------------------------------------
# advantages and rewards


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages. rewards [B] (group-contiguous) -> [B].

    scale_by_std: (r - mean_g) / (std_g + eps), unbiased std; else r - mean_g (Dr. GRPO).
    """
    r = _as_float(_groups(rewards, group_size))
    centered = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    return centered.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, *, scale_by_std: bool = False) -> torch.Tensor:
    """Leave-one-out advantages r_i - mean_{j != i} r_j. rewards [B] -> [B]. RLOO does not scale by
    the std; `scale_by_std` is taken (and ignored) so every estimator has one signature."""
    r = _as_float(_groups(rewards, group_size))
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - others_mean).reshape(-1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment. lengths [B] -> [B] float in [-1, 0].

    0 for L <= max_len - buffer_len; (max_len - buffer_len - L) / buffer_len in
    the buffer (reaching -1 at L = max_len); -1 beyond max_len.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"need 0 < buffer_len <= max_len, got {buffer_len}, {max_len}")
    pen = (max_len - buffer_len - _as_float(lengths)) / buffer_len
    return pen.clamp(min=-1.0, max=0.0)


def longest_reply(mask: torch.Tensor) -> torch.Tensor:
    """Length of each sequence's longest reply: its longest run of policy tokens. mask [B, T]
    (1 on the policy's tokens; 0 on a multi-turn trajectory's observations and on padding) -> [B]
    float. A single reply (all ones up to its length) gives its length: what DAPO's overlong
    punishment measures. Two replies with no observation token between them would count as one."""
    m = _as_float(mask)
    if m.shape[1] == 0:
        return m.new_zeros(m.shape[0])
    seen = m.cumsum(dim=1)  # policy tokens so far
    before = torch.where(m == 0, seen, torch.zeros_like(seen)).cummax(dim=1).values  # ... at the last 0
    return ((seen - before) * m).max(dim=1).values


def has_variance(rewards: Iterable[float]) -> bool:
    """Whether a group's rewards differ: at least two distinct values among those that are not NaN
    (a failed reward is NaN). The one test of "this group carries signal": DAPO's dynamic sampling
    keeps such groups, `reward/zero_variance_groups` counts the others."""
    return len({r for r in rewards if r == r}) > 1


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling filter. rewards [B] -> bool [P], `has_variance` of each group."""
    return torch.tensor([has_variance(row) for row in _groups(rewards, group_size).tolist()], dtype=torch.bool)


# ---------------------------------------------------------------------------
# KL and aggregation


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate. logp, ref_logp [B, T] -> [B, T].

    k1 = logp - ref; k2 = 0.5 (logp - ref)^2; k3 = exp(ref - logp) - (ref - logp) - 1.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def aggregate_loss(loss_tok: torch.Tensor, mask: torch.Tensor, mode: str, *,
                   max_tokens: Optional[int] = None, num_tokens=None, num_seqs=None) -> torch.Tensor:
    """Reduce per-token losses [B, T] under mask [B, T] to a scalar (see module doc).

    num_tokens / num_seqs: global denominators (valid tokens / sequences of the
    full batch) replacing the local ones, for micro-batch / DP accumulation.
    """
    m = mask.bool()
    masked = torch.where(m, loss_tok, torch.zeros_like(loss_tok))
    n_seqs = _denom(loss_tok.shape[0] if num_seqs is None else num_seqs, masked)
    if mode == "token_mean":
        n_tok = m.sum() if num_tokens is None else num_tokens
        return masked.sum() / _denom(n_tok, masked)
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1).to(masked.dtype)
        return per_seq.sum() / n_seqs
    if mode == "seq_mean_token_sum_norm":
        if max_tokens is None:
            raise ValueError("seq_mean_token_sum_norm requires max_tokens")
        return masked.sum() / (n_seqs * _denom(max_tokens, masked))
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")


# ---------------------------------------------------------------------------
# surrogates


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float,
                       clip_high: float) -> torch.Tensor:
    """Per-token pessimistic PPO loss max(-A*ratio, -A*clip(ratio)). [B, T] -> [B, T]."""
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(-adv * ratio, -adv * clipped)


def truncated_is_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w = min(exp(old_logp - engine_logp), cap) [B, T] (no grad; 1 where masked), and its
    masked stats: is_weight_mean, is_weight_max, is_clipped_frac (tokens where w hit the cap).
    `cap` <= 0: no truncation."""
    m = mask.bool()
    with torch.no_grad():
        raw = torch.exp(torch.where(m, old_logp - engine_logp, torch.zeros_like(old_logp))).float()
        w = raw.clamp(max=cap) if cap > 0 else raw
        metrics = {
            "is_weight_mean": masked_mean(w, m),
            "is_weight_max": w[m].max() if m.any() else w.new_ones(()),
            "is_clipped_frac": masked_mean((raw > cap).float(), m) if cap > 0 else w.new_zeros(()),
        }
    return w, metrics


def _weighted(loss_tok: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return loss_tok if weights is None else loss_tok * weights.to(loss_tok.dtype)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                agg: str = "token_mean", max_tokens: Optional[int] = None,
                num_tokens=None, num_seqs=None,
                token_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO clipped surrogate. logp, old_logp, mask [B, T]; advantages [B];
    token_weights [B, T] (importance weights, no grad) multiply each token's loss.

    Returns (scalar loss, metrics). Metrics are detached 0-dim float tensors,
    masked token means over this call's valid tokens: clip_frac_low (ratio <
    1-clip_low and A < 0), clip_frac_high (ratio > 1+clip_high and A > 0),
    approx_kl (k3 of old vs new), ratio_mean.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    adv = advantages.to(ratio.dtype).unsqueeze(-1).expand_as(ratio)
    loss = aggregate_loss(_weighted(_clipped_objective(ratio, adv, clip_low, clip_high), token_weights), m, agg,
                          max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        metrics = {
            "clip_frac_low": masked_mean(low.float(), m),
            "clip_frac_high": masked_mean(high.float(), m),
            "approx_kl": masked_mean(kl_penalty(logp, old_logp, "k3").float(), m),
            "ratio_mean": masked_mean(ratio.float(), m),
        }
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, clip_low: float, clip_high: float,
              agg: str = "seq_mean_token_mean", max_tokens: Optional[int] = None,
              num_tokens=None, num_seqs=None,
              token_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token surrogate. logp, old_logp, mask [B, T]; advantages [B]; token_weights as policy_loss.

    s_i = exp(masked mean_t(logp - old_logp)) [B]; s_tok = sg[s_i]*exp(logp - sg[logp])
    [B, T]; per token max(-A*s_tok, -A*clip(s_tok)). Fully masked rows give
    s_i = 1 and contribute 0. Metrics as policy_loss, except clip_frac_low/high
    are fractions of sequences (with >= 1 valid token) clipped at sequence level;
    approx_kl and ratio_mean stay masked token means.
    """
    m = mask.bool()
    zeros = torch.zeros_like(logp)
    log_ratio = torch.where(m, logp - old_logp, zeros)
    seq_ratio = torch.exp(masked_mean(log_ratio, m, dim=-1))  # [B]
    safe_logp = torch.where(m, logp, zeros)
    s_tok = seq_ratio.detach().unsqueeze(-1) * torch.exp(safe_logp - safe_logp.detach())
    adv = advantages.to(s_tok.dtype).unsqueeze(-1).expand_as(s_tok)
    loss = aggregate_loss(_weighted(_clipped_objective(s_tok, adv, clip_low, clip_high), token_weights), m, agg,
                          max_tokens=max_tokens, num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        seq_valid = m.any(dim=-1)
        a = advantages.to(seq_ratio.dtype)
        low = (seq_ratio < 1.0 - clip_low) & (a < 0)
        high = (seq_ratio > 1.0 + clip_high) & (a > 0)
        metrics = {
            "clip_frac_low": masked_mean(low.float(), seq_valid),
            "clip_frac_high": masked_mean(high.float(), seq_valid),
            "approx_kl": masked_mean(kl_penalty(logp, old_logp, "k3").float(), m),
            "ratio_mean": masked_mean(s_tok.float(), m),
        }
    return loss, {k: v.detach().float() for k, v in metrics.items()}
