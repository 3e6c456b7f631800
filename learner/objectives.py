"""Objectives: what the learner minimises, as picklable callables over one micro-batch.

The learner worker knows nothing about the algorithm: it computes token logprobs (and, when an
objective asks, reference logprobs and entropy) and hands them to an objective. GRPO and its
variants are one objective configured by `algo` (`GRPOObjective.from_config`, which also decides
whether a reference model is kept and which old policy the ratio uses); SFT is another (the
stages `sft` and `distill`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from learner import grpo
from learner.algos import SURROGATES


@dataclass
class Micro:
    """Tensors of one micro-batch, in the scored window of `learner.batch.Padded`."""

    logp: torch.Tensor  # [b, T] learner logprobs of the sampled tokens (with grad)
    old_logp: torch.Tensor  # [b, T] behaviour-policy logprobs (no grad)
    mask: torch.Tensor  # [b, T]
    advantages: torch.Tensor  # [b]
    entropy: Optional[torch.Tensor]  # [b, T] when the objective needs it
    ref_logp: Optional[torch.Tensor]  # [b, T] when the objective needs it
    num_tokens: int  # valid tokens of the whole (global) mini-batch
    num_seqs: int  # sequences of the whole (global) mini-batch
    engine_logp: Optional[torch.Tensor] = None  # [b, T] the sampling engine's logprobs of the tokens


@dataclass
class GRPOObjective:
    """Clipped-surrogate policy loss (+ KL to a reference, − entropy bonus), per `algo`."""

    loss: str = "ppo"  # a name in learner.algos.SURROGATES: "ppo" (token ratio) | "gspo" (sequence ratio)
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "seq_mean_token_mean"
    max_tokens: Optional[int] = None  # Dr. GRPO's constant normaliser (max new tokens)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    is_cap: float = 2.0  # truncation of the importance weights to the engine's policy (logged always)
    off_policy: str = ""  # "": on-policy; "learner": old = learner's logprobs, × TIS weights; "engine": old = engine's
    kl_in_reward: bool = False  # the KL to the reference is a reward term (`reference_kl`), not in this loss

    @classmethod
    def from_config(cls, algo: Any, rollout: Any) -> "GRPOObjective":
        """The objective of `algo.*`: its KL term here only with `kl_in=loss` (with `kl_in=reward` the
        learner still keeps the reference model, for `reference_kl`); Dr. GRPO's normaliser is
        `rollout.max_new_tokens`; the ratio's old policy is `algo.old_logprobs` only when generation
        may run ahead of the learner (`rollout.max_staleness > 0`), else the learner's own."""
        return cls(loss=algo.loss, clip_low=algo.clip_low, clip_high=algo.clip_high, agg=algo.loss_agg,
                   max_tokens=rollout.max_new_tokens, kl_coef=algo.kl_coef if algo.kl_in == "loss" else 0.0,
                   kl_estimator=algo.kl_estimator, entropy_coef=algo.entropy_coef, is_cap=algo.is_cap,
                   off_policy=algo.old_logprobs if rollout.max_staleness > 0 else "",
                   kl_in_reward=algo.kl_in == "reward" and algo.kl_coef > 0)

    @property
    def needs_reference(self) -> bool:
        """The loss takes reference logprobs (its KL term)."""
        return self.kl_coef > 0

    @property
    def needs_reference_model(self) -> bool:
        """The learner loads a frozen reference model: for the loss's KL term, or the reward's."""
        return self.needs_reference or self.kl_in_reward

    @property
    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef > 0

    def __call__(self, mb: Micro) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        agg = dict(agg=self.agg, max_tokens=self.max_tokens, num_tokens=mb.num_tokens, num_seqs=mb.num_seqs)
        surrogate = SURROGATES[self.loss]
        weights, is_metrics = (None, {}) if mb.engine_logp is None else \
            grpo.truncated_is_weights(mb.old_logp, mb.engine_logp, mb.mask, self.is_cap)
        old = mb.engine_logp if self.off_policy == "engine" else mb.old_logp
        apply = self.off_policy == "learner" and self.is_cap > 0
        loss, metrics = surrogate(mb.logp, old, mb.advantages, mb.mask, clip_low=self.clip_low,
                                  clip_high=self.clip_high, token_weights=weights if apply else None, **agg)
        metrics.update(is_metrics)
        if self.kl_coef > 0:
            kl_tok = grpo.kl_penalty(mb.logp, mb.ref_logp, self.kl_estimator)
            loss = loss + self.kl_coef * grpo.aggregate_loss(kl_tok, mb.mask, self.agg, max_tokens=self.max_tokens,
                                                              num_tokens=mb.num_tokens, num_seqs=mb.num_seqs)
            metrics["kl_ref"] = grpo.masked_mean(kl_tok.detach(), mb.mask)
        if self.entropy_coef > 0:
            loss = loss - self.entropy_coef * grpo.aggregate_loss(
                mb.entropy, mb.mask, self.agg, max_tokens=self.max_tokens,
                num_tokens=mb.num_tokens, num_seqs=mb.num_seqs)
        return loss, metrics


@dataclass
class SFTObjective:
    """Token-mean negative log-likelihood of the completion tokens (cold-start SFT, distillation)."""

    needs_reference: bool = False
    needs_entropy_grad: bool = False

    @property
    def needs_reference_model(self) -> bool:
        return self.needs_reference

    def __call__(self, mb: Micro) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll = torch.where(mb.mask > 0, -mb.logp, torch.zeros_like(mb.logp))
        return nll.sum() / max(mb.num_tokens, 1), {"nll": grpo.masked_mean(-mb.logp.detach(), mb.mask)}
