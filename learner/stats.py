"""A learner step's metrics: accumulated on the device per micro-batch, reduced over ranks once."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class StepStats:
    """Token-weighted means of micro-batch metrics (maxima for `*_max`), reduced over ranks at the
    end of a step. Accumulated on the device in float64 and read back once, in `finish`: the host
    never waits for the GPU between micro-batches (the same float64 sums as reading each value)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.tokens: torch.Tensor | float = 0.0
        self.slots = [0.0, 0.0]  # padding token slots, all token slots of the forwards' rows
        self.steps: list[tuple[float, float]] = []

    def add_micro(self, loss, metrics, logp, entropy, padded) -> None:
        mask = padded.mask
        n = mask.sum().double()
        per_token = n.clamp(min=1).float()
        values = {k: v.detach().double() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)
                  for k, v in metrics.items()}
        if entropy is not None:
            values["entropy"] = ((entropy.detach() * mask).sum() / per_token).double()
        values["logprob_mismatch"] = (((logp - padded.rollout_logprobs).abs() * mask).sum() / per_token).double()
        for k, v in values.items():
            v = v.to(n.device)
            if k.endswith("_max"):
                self.maxima[k] = v if k not in self.maxima else torch.maximum(self.maxima[k], v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss.detach().double().to(n.device)
        self.tokens = self.tokens + n
        self.slots[0] += padded.input_ids.numel() - padded.tokens
        self.slots[1] += padded.input_ids.numel()

    def add_step(self, grad_norm: float, lr: float) -> None:
        self.steps.append((grad_norm, lr))

    def finish(self, all_reduce) -> dict[str, float]:
        keys, maxima = sorted(self.sums), sorted(self.maxima)
        host = _to_host([self.sums[k] for k in keys] + [self.tokens] + [self.maxima[k] for k in maxima])
        sums, tokens, peaks = host[:len(keys)], host[len(keys)], host[len(keys) + 1:]
        totals = all_reduce(*(sums + self.slots + [tokens]))
        tokens = max(totals[-1], 1.0)
        out = {k: (v if k == "loss" else v / tokens) for k, v in zip(keys, totals[:-3])}
        out["padding_frac"] = totals[-3] / max(totals[-2], 1.0)
        out.update(zip(maxima, all_reduce(*peaks, op=dist.ReduceOp.MAX) if maxima else []))
        out["loss"] = out["loss"] / len(self.steps)
        out["grad_norm"] = self.steps[-1][0]
        out["lr"] = self.steps[-1][1]
        out["skipped_steps"] = float(sum(not math.isfinite(g) for g, _ in self.steps))
        out["train_tokens"] = totals[-1]
        return out


def _to_host(values: list) -> list[float]:
    """Python floats of 0-d tensors (one device-to-host copy for all of them) and of plain numbers."""
    tensors = [v for v in values if torch.is_tensor(v)]
    flat = iter(torch.stack([t.reshape(()).to(tensors[0].device) for t in tensors]).tolist()) if tensors else iter(())
    return [next(flat) if torch.is_tensor(v) else float(v) for v in values]
