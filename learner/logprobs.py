"""Token logprobs (and entropies) from logits, a chunk of positions at a time, so a large vocabulary
never needs a full fp32 log-softmax copy of a micro-batch's logits."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [b, T, V], targets [b, T] -> logprob of each target [b, T] (no full log-softmax copy)."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                 entropy: bool, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] (a run of positions), targets [m] -> logprob and entropy of each target [m]:
    position index[j] of the run scores targets[j] (index None: m = n, position j scores target j)."""
    x = logits.float() / temperature
    if index is None:
        logp = token_logprobs(x, targets)
        return logp, (token_entropy(x) if entropy else logp.new_zeros(()))
    logp = x[index, targets] - torch.logsumexp(x, dim=-1)[index]
    return logp, (token_entropy(x)[index] if entropy else logp.new_zeros(()))


def _slots_by_chunk(index: torch.Tensor, step: int, chunks: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """index [S] (a logits position per slot) -> the slots each run of `step` positions scores
    (chunk-major), and the permutation [S] putting chunk-major results back into slot order."""
    order = torch.argsort(index // step, stable=True)
    counts = torch.bincount(index // step, minlength=chunks)
    return list(order.split(counts.tolist())), torch.argsort(order)


def chunked_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int,
                     entropy: str = "", index: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [b, T, V] (model dtype), targets [b, T] -> (fp32 logprob of each target at
    `temperature` [b, T], entropy [b, T] or None), `chunk` positions at a time: the fp32 copy and
    softmax temporaries exist for one chunk, and under activation checkpointing only the logits
    themselves are kept for backward — with a 150k vocabulary at 16k tokens a micro-batch, ~20 GB
    less than computing it at once. `entropy`: "" none, "metric" (no graph), "grad" (in the graph).
    `chunk` 0: all positions at once. `index` [b, T] (shared-prompt layout, logits [rows, W, V]):
    slot (i, t) is scored by position index[i, t] of logits.reshape(rows * W, V); each chunk of
    positions scores the slots that point into it (one position may score several), so nothing
    beyond a chunk is ever copied."""
    from torch.utils.checkpoint import checkpoint

    b, t = targets.shape
    flat, tgt_all = logits.reshape(-1, logits.shape[-1]), targets.reshape(b * t)
    step = chunk if chunk > 0 else flat.shape[0]
    pieces = flat.split(step)  # views sharing one backward node: no full-size gradient per chunk
    if index is None:
        runs, order = [(tgt, None) for tgt in tgt_all.split(step)], None
    else:
        slots, order = _slots_by_chunk(index.reshape(b * t), step, len(pieces))
        runs = [(tgt_all[s], index.reshape(b * t)[s] - c * step) for c, s in enumerate(slots)]
    logps, ents = [], []
    for piece, (tgt, idx) in zip(pieces, runs):
        if tgt.numel() == 0:
            continue
        if piece.requires_grad:
            logp, ent = checkpoint(_chunk_stats, piece, tgt, temperature, entropy == "grad", idx, use_reentrant=False)
        else:
            logp, ent = _chunk_stats(piece, tgt, temperature, entropy == "grad", idx)
        if entropy == "metric":
            with torch.no_grad():
                ent = token_entropy(piece.detach().float() / temperature)
                ent = ent if idx is None else ent[idx]
        logps.append(logp)
        ents.append(ent)
    logp, ent_all = torch.cat(logps), (torch.cat(ents) if entropy else None)
    if order is not None:
        logp, ent_all = logp[order], (ent_all[order] if entropy else None)
    return logp.reshape(b, t), (ent_all.reshape(b, t) if entropy else None)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits [b, T, V] -> entropy of each position's distribution [b, T]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
