"""From scored groups to a TrainBatch: rewards → group-relative advantages (via learner.grpo).

A sample whose reward failed (raised or timed out) is excluded from training (loss weight 0) and
from its group's statistics: advantages are computed over the group's successful samples only.
A group with fewer than two successful samples contributes nothing (advantage 0).

DAPO's overlong punishment (`overlong_shaping`) measures what the policy controls against the
limit it sampled under: a single reply's length against rollout.max_new_tokens (as DAPO), and
for a multi-turn trajectory its longest reply (each reply has that limit), never the
environment's observation tokens nor the number of turns (env.max_turns and env.max_total_tokens
cut a trajectory instead; a cut is counted in `env/cut_*`).
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
    """DAPO's soft overlong punishment as a reward term [P, G] (zeros when buffer is 0), on each
    completion's longest reply (`grpo.longest_reply`): a single reply's length, exactly as before
    multi-turn; a trajectory's longest run of policy tokens, against the per-reply `max_tokens`
    (a policy is not punished for a tool's long output, nor for taking several turns)."""
    shape = (len(groups), len(groups[0].completions) if groups else 0)
    if buffer <= 0:
        return torch.zeros(shape)
    lengths = grpo.longest_reply(_padded(_mask_rows(groups)))
    return factor * grpo.overlong_penalty(lengths, max_tokens, buffer).reshape(shape)


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
    return _mask_rows(groups)


def _mask_rows(groups: list[Group]) -> list[list[int]]:
    """B × C_i, 1 on the policy's tokens: a trajectory's mask, all ones for a single reply."""
    return [c.mask if c.mask is not None else [1] * len(c.token_ids) for g in groups for c in g.completions]


def _padded(rows: list[list[int]]) -> torch.Tensor:
    """B × C_i ragged 0/1 rows -> [B, max C_i] float, right-padded with 0."""
    out = torch.zeros(len(rows), max([0] + [len(r) for r in rows]))
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out
