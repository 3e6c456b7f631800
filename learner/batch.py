"""What the learner consumes: ragged sequences plus per-sequence advantages, and their padding.

The driver builds a `TrainBatch` from scored groups; each learner rank receives its shard and
pads micro-batches itself (padding to the whole batch's longest sequence would waste compute).
Token ids are the engine's own: nothing is re-tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainBatch:
    """B sequences, group-contiguous (the G completions of a prompt are adjacent)."""

    prompt_ids: list[list[int]]  # B × P_i
    completion_ids: list[list[int]]  # B × C_i
    rollout_logprobs: list[list[float]]  # B × C_i: engine logprob of each sampled token
    advantages: list[float]  # B
    loss_weights: list[float]  # B: 1 trains on the sequence, 0 excludes it (e.g. failed reward)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, index: list[int]) -> "TrainBatch":
        return TrainBatch(*([field[i] for i in index] for field in (
            self.prompt_ids, self.completion_ids, self.rollout_logprobs, self.advantages, self.loss_weights)))

    def shard(self, rank: int, world_size: int) -> "TrainBatch":
        """Contiguous shard `rank` of `world_size` (B must divide evenly)."""
        if len(self) % world_size:
            raise ValueError(f"a batch of {len(self)} sequences does not split over {world_size} ranks")
        per = len(self) // world_size
        return self.select(list(range(rank * per, (rank + 1) * per)))

    def lengths(self) -> list[int]:
        return [len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids)]


@dataclass
class Padded:
    """A padded micro-batch. Position t of the token tensors scores input token t+1."""

    input_ids: torch.Tensor  # [b, L] right-padded
    attention_mask: torch.Tensor  # [b, L]
    targets: torch.Tensor  # [b, T] next tokens for the scored window, T = L - start
    completion: torch.Tensor  # [b, T] 1 on completion tokens (whatever the loss weight)
    mask: torch.Tensor  # [b, T] completion tokens of sequences with loss weight > 0
    rollout_logprobs: torch.Tensor  # [b, T]
    advantages: torch.Tensor  # [b]
    start: int  # first position whose logits are scored (earliest completion - 1)


def pad(batch: TrainBatch, pad_id: int, device) -> Padded:
    """Right-pad a (small) batch; the scored window starts at the earliest completion."""
    lengths = batch.lengths()
    L = max(lengths)
    start = min(len(p) for p in batch.prompt_ids) - 1
    b, T = len(batch), L - start
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    attention = torch.zeros((b, L), dtype=torch.long)
    completion = torch.zeros((b, T))
    old = torch.zeros((b, T))
    for i, (p, c, lp, w) in enumerate(zip(batch.prompt_ids, batch.completion_ids, batch.rollout_logprobs,
                                          batch.loss_weights)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        attention[i, :n] = 1
        lo = len(p) - 1 - start  # window index scoring the first completion token
        if c:
            completion[i, lo:lo + len(c)] = 1.0
            old[i, lo:lo + len(c)] = torch.tensor(lp)
    targets = torch.roll(input_ids, -1, dims=1)[:, start:]
    weights = torch.tensor([float(w > 0) for w in batch.loss_weights]).unsqueeze(1)
    return Padded(input_ids.to(device), attention.to(device), targets.to(device), completion.to(device),
                  (completion * weights).to(device), old.to(device),
                  torch.tensor(batch.advantages, dtype=torch.float32, device=device), start)


def micro_batches(lengths: list[int], token_budget: int, count: int | None = None) -> list[list[int]]:
    """Split sequence indices into micro-batches whose padded size (b × longest) fits the budget.

    Sequences are taken longest first so similar lengths share padding. With `count`, the split
    is extended with empty micro-batches to exactly `count` (FSDP ranks must run the same number
    of forward/backward passes)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= token_budget:
            out[-1].append(i)
        else:
            out.append([i])
    if count is not None:
        if count < len(out):
            raise ValueError(f"{len(out)} micro-batches needed, {count} allowed")
        out += [[] for _ in range(count - len(out))]
    return out
