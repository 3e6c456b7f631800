"""From scored groups to a TrainBatch: rewards → group-relative advantages (via learner.grpo).

A sample whose reward failed (raised or timed out) is excluded from training (loss weight 0) and
from its group's statistics: advantages are computed over the group's successful samples only.
A group with fewer than two successful samples contributes nothing (advantage 0).
"""

from __future__ import annotations

from typing import Any

import torch

from actors.scoring import Score
from actors.types import Group
from learner import grpo
from learner.algos import ADVANTAGES
from learner.batch import TrainBatch


def advantages(rewards: torch.Tensor, group_size: int, algo: Any) -> torch.Tensor:
    """rewards [B] -> advantages [B] by the estimator `algo.advantage` names (learner.algos.ADVANTAGES)."""
    return ADVANTAGES[algo.advantage](rewards, group_size, scale_by_std=algo.scale_by_std)


def reward_matrix(scores: list[list[Score]]) -> torch.Tensor:
    """Rewards [P, G], NaN where the reward failed."""
    return torch.tensor([[s.reward if s.ok else float("nan") for s in row] for row in scores])


def overlong_shaping(groups: list[Group], max_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment as a reward term [P, G] (zeros when buffer is 0)."""
    lengths = torch.tensor([[len(c.token_ids) for c in g.completions] for g in groups], dtype=torch.float32)
    if buffer <= 0:
        return torch.zeros_like(lengths)
    return factor * grpo.overlong_penalty(lengths.reshape(-1), max_tokens, buffer).reshape(lengths.shape)


def build_batch(groups: list[Group], scores: list[list[Score]], algo: Any,
                shaping: torch.Tensor | None = None) -> tuple[TrainBatch, torch.Tensor]:
    """Returns the batch and the raw rewards [P, G] (NaN where the reward failed). `shaping` [P, G]
    (overlong penalty, KL-in-reward) is added to the rewards the advantages are computed from."""
    raw = reward_matrix(scores)
    ok = ~raw.isnan()
    shaped = raw if shaping is None else raw + shaping
    adv = torch.zeros_like(raw)
    for i, row in enumerate(shaped):  # each group over its successful samples only
        if int(ok[i].sum()) >= 2:
            adv[i, ok[i]] = advantages(row[ok[i]], int(ok[i].sum()), algo)
    batch = TrainBatch(
        prompt_ids=[g.prompt_token_ids for g in groups for _ in g.completions],
        completion_ids=[c.token_ids for g in groups for c in g.completions],
        rollout_logprobs=[c.logprobs for g in groups for c in g.completions],
        advantages=adv.reshape(-1).tolist(),
        loss_weights=ok.reshape(-1).float().tolist(),
        token_mask=_token_mask(groups),
    )
    return batch, raw


def _token_mask(groups: list[Group]) -> list[list[int]] | None:
    """B × C_i, 1 on the policy's tokens, for batches holding multi-turn trajectories (else None)."""
    if all(c.mask is None for g in groups for c in g.completions):
        return None
    return [c.mask if c.mask is not None else [1] * len(c.token_ids) for g in groups for c in g.completions]
