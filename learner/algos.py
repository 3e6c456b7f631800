"""The algorithm's named choices (`algo.*`), one registry each; torch-free, so config validation
checks names against them without importing the math.

- ADVANTAGES: estimator(rewards [B], group_size, *, scale_by_std) -> advantages [B]
- SURROGATES: loss(logp, old_logp, advantages, mask, *, clip_low, clip_high, agg, ...) -> (loss, metrics)
- LOSS_AGGREGATIONS, KL_ESTIMATORS: the modes `learner.grpo.aggregate_loss` / `kl_penalty` take.
"""

from __future__ import annotations

from common.registry import LazyRegistry

ADVANTAGES = LazyRegistry({
    "grpo": "learner.grpo:group_advantages",  # (r - mean) / std per group; Dr. GRPO with scale_by_std=false
    "rloo": "learner.grpo:rloo_advantages",  # r - mean of the others
})
SURROGATES = LazyRegistry({
    "ppo": "learner.grpo:policy_loss",  # token ratio, clipped per token
    "gspo": "learner.grpo:gspo_loss",  # sequence ratio, clipped per sequence
})
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
