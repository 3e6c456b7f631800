"""What the learner consumes: ragged sequences plus per-sequence advantages, and their padding.

The driver builds a `TrainBatch` from scored groups and pads it to split evenly over the ranks
(`pad_to_multiple`); each learner rank receives its shard and pads micro-batches itself
(padding to the whole batch's longest sequence would waste compute).
With shared prompts (`prompt_rows`, `pack`) a group's prompt runs once: its completions follow it
in one row under a block attention mask, each seeing the prompt and itself only (the idea of
Prefix Grouper, Liu et al. 2025), so logprobs and gradients equal those of the padded rows.
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
    token_mask: list[list[int]] | None = None  # B × C_i: 1 on the policy's tokens, 0 on a multi-turn
    # trajectory's environment tokens (in the sequence, never in the loss); None: every token

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, index: list[int]) -> "TrainBatch":
        fields = [[field[i] for i in index] for field in (
            self.prompt_ids, self.completion_ids, self.rollout_logprobs, self.advantages, self.loss_weights)]
        mask = None if self.token_mask is None else [self.token_mask[i] for i in index]
        return TrainBatch(*fields, token_mask=mask)

    def policy_tokens(self, i: int) -> list[float]:
        """[C_i] 1.0 where sequence i's token counts in the loss (loss weight aside)."""
        c = self.completion_ids[i]
        return [1.0] * len(c) if self.token_mask is None else [float(m) for m in self.token_mask[i]]

    def shard(self, rank: int, world_size: int) -> "TrainBatch":
        """Contiguous shard `rank` of `world_size` (B must divide evenly)."""
        if len(self) % world_size:
            raise ValueError(f"a batch of {len(self)} sequences does not split over {world_size} ranks")
        per = len(self) // world_size
        return self.select(list(range(rank * per, (rank + 1) * per)))

    def lengths(self) -> list[int]:
        return [len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids)]


def pad_to_multiple(batch: TrainBatch, multiple: int) -> tuple[TrainBatch, int]:
    """Append zero-weight copies of the last sequence until len(batch) % multiple == 0 (a batch
    splits evenly over ranks, or ranks × mini-batches); returns the batch and how many were added."""
    extra = (-len(batch)) % multiple
    if extra == 0:
        return batch, 0
    index = list(range(len(batch))) + [len(batch) - 1] * extra
    padded = batch.select(index)
    padded.loss_weights[len(batch):] = [0.0] * extra
    return padded, extra


@dataclass
class Padded:
    """A padded micro-batch: `rows` token rows, scored in a per-sequence window [b, T].

    Plain (`pad`): one row per sequence (rows = b); window position t scores input token
    start + t + 1, T = L - start. Shared prompts (`pack`): one row per group (or part of one),
    [prompt, c_1, ..., c_k] under a block attention mask; window slot t of a sequence scores its
    completion token t, T = longest completion, and `index` says which logits position does."""

    input_ids: torch.Tensor  # [rows, L] right-padded
    attention_mask: torch.Tensor  # [rows, L] (plain) or [rows, 1, L, L] additive, model dtype (shared)
    targets: torch.Tensor  # [b, T] the token each window slot scores
    completion: torch.Tensor  # [b, T] 1 on completion tokens (whatever the loss weight)
    mask: torch.Tensor  # [b, T] the policy's completion tokens of sequences with loss weight > 0
    rollout_logprobs: torch.Tensor  # [b, T]
    advantages: torch.Tensor  # [b]
    start: int  # first row position whose logits are computed: logits [rows, L - start, V]
    tokens: int = 0  # real (non-padding) token slots of input_ids
    index: torch.Tensor | None = None  # [b, T] long, into logits.reshape(rows * (L - start), V); None: plain
    position_ids: torch.Tensor | None = None  # [rows, L] (shared); None: 0..L-1


def pad(batch: TrainBatch, pad_id: int, device) -> Padded:
    """Right-pad a (small) batch; the scored window starts at the earliest completion."""
    lengths = batch.lengths()
    L = max(lengths)
    start = min(len(p) for p in batch.prompt_ids) - 1
    b, T = len(batch), L - start
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    attention = torch.zeros((b, L), dtype=torch.long)
    completion = torch.zeros((b, T))
    policy = torch.zeros((b, T))
    old = torch.zeros((b, T))
    for i, (p, c, lp, w) in enumerate(zip(batch.prompt_ids, batch.completion_ids, batch.rollout_logprobs,
                                          batch.loss_weights)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        attention[i, :n] = 1
        lo = len(p) - 1 - start  # window index scoring the first completion token
        if c:
            completion[i, lo:lo + len(c)] = 1.0
            policy[i, lo:lo + len(c)] = torch.tensor(batch.policy_tokens(i))
            old[i, lo:lo + len(c)] = torch.tensor(lp)
    targets = torch.roll(input_ids, -1, dims=1)[:, start:]
    weights = torch.tensor([float(w > 0) for w in batch.loss_weights]).unsqueeze(1)
    return Padded(input_ids.to(device), attention.to(device), targets.to(device), completion.to(device),
                  (policy * weights).to(device), old.to(device),
                  torch.tensor(batch.advantages, dtype=torch.float32, device=device), start, sum(lengths))


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


def prompt_rows(batch: TrainBatch, token_budget: int, share: bool = True) -> list[list[int]]:
    """Sequence indices by row. `share`: a row is a run of consecutive sequences with one prompt
    (a group, or part of one: a row is closed when prompt + completions would exceed
    `token_budget`; it holds at least one sequence). Otherwise one sequence per row."""
    if not share:
        return [[i] for i in range(len(batch))]
    rows: list[list[int]] = []
    size = 0
    for i, (p, c) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
        if rows and batch.prompt_ids[rows[-1][0]] == p and size + len(c) <= token_budget:
            rows[-1].append(i)
            size += len(c)
        else:
            rows.append([i])
            size = len(p) + len(c)
    return rows


def row_lengths(batch: TrainBatch, rows: list[list[int]]) -> list[int]:
    """Tokens of each packed row: its prompt once plus its sequences' completions."""
    return [len(batch.prompt_ids[row[0]]) + sum(len(batch.completion_ids[i]) for i in row) for row in rows]


def block_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """segments [R, L] (0 prompt, k >= 1 completion k, -1 padding) -> additive mask [R, 1, L, L]
    (0 attend, dtype min blocked): the prompt is causal; completion k attends to the whole prompt
    and causally to its own tokens; a padding position attends to itself only (no empty row)."""
    L = segments.shape[1]
    pos = torch.arange(L, device=segments.device)
    causal = pos[:, None] >= pos[None, :]  # [L(q), L(k)]
    keys = (segments[:, :, None] == segments[:, None, :]) | (segments == 0)[:, None, :]  # [R, L, L]
    allowed = torch.where((segments >= 0)[:, :, None], causal & keys, pos[:, None] == pos[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _row(batch: TrainBatch, row: list[int]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One packed row [prompt, c_1, ..., c_k] -> (tokens, segments, position ids) [L_r] and, per
    sequence, the row position whose logits score each completion token [C_i]."""
    prompt = batch.prompt_ids[row[0]]
    P = len(prompt)
    tokens, segments, positions, scorers = list(prompt), [0] * P, list(range(P)), []
    for k, i in enumerate(row, 1):
        c, o = batch.completion_ids[i], len(tokens)
        scorers.append(([P - 1] + list(range(o, o + len(c) - 1)))[:len(c)])  # token 0: prompt's last
        tokens += c
        segments += [k] * len(c)
        positions += range(P, P + len(c))
    return tokens, segments, positions, scorers


def pack(batch: TrainBatch, rows: list[list[int]], pad_id: int, device, dtype=torch.float32) -> Padded:
    """Shared-prompt micro-batch: row r is [prompt, c_i for i in rows[r]] (its sequences share the
    prompt) under `block_mask`, each completion's position ids continuing the prompt's. Sequences
    take the [b, T] window in row order (b = Σ |rows[r]|, T = longest completion); `index` points
    each window slot at its scoring position in the flattened logits [rows × (L - start)]."""
    seqs = [i for row in rows for i in row]
    L = max(row_lengths(batch, rows))
    start = min(len(batch.prompt_ids[row[0]]) for row in rows) - 1
    R, W, b = len(rows), L - start, len(seqs)
    T = max([1] + [len(batch.completion_ids[i]) for i in seqs])
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    segments = torch.full((R, L), -1, dtype=torch.long)
    positions = torch.zeros((R, L), dtype=torch.long)
    index, targets = torch.zeros((b, T), dtype=torch.long), torch.full((b, T), pad_id, dtype=torch.long)
    completion, policy, old = torch.zeros((b, T)), torch.zeros((b, T)), torch.zeros((b, T))
    s = 0
    for r, row in enumerate(rows):
        tokens, segs, pos, scorers = _row(batch, row)
        for out, values in ((input_ids, tokens), (segments, segs), (positions, pos)):
            out[r, :len(values)] = torch.tensor(values, dtype=torch.long)
        for i, scorer in zip(row, scorers):
            n = len(scorer)
            index[s, :n] = torch.tensor(scorer, dtype=torch.long) + (r * W - start)
            targets[s, :n] = torch.tensor(batch.completion_ids[i], dtype=torch.long)
            completion[s, :n] = 1.0
            policy[s, :n] = torch.tensor(batch.policy_tokens(i))
            old[s, :n] = torch.tensor(batch.rollout_logprobs[i])
            s += 1
    weights = torch.tensor([float(batch.loss_weights[i] > 0) for i in seqs]).unsqueeze(1)
    return Padded(input_ids.to(device), block_mask(segments.to(device), dtype), targets.to(device),
                  completion.to(device), (policy * weights).to(device), old.to(device),
                  torch.tensor([batch.advantages[i] for i in seqs], dtype=torch.float32, device=device), start,
                  sum(row_lengths(batch, rows)), index.to(device), positions.to(device))
