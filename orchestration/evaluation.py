"""Held-out evaluation through the rollout actors: greedy pass@1 and sampled pass@k.

Uses the same engines (and so the same weights) as training; needs no learner, so
`raygrpo stage=eval model.path=<dir>` evaluates any saved policy on its own. Accuracy is the
`accuracy` reward (lenient extraction, verified with math-verify), scored with real deadlines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.scoring import Scorer
from actors.types import Prompt, SamplingSpec
from orchestration.pools import RolloutPool


@dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/accuracy (greedy pass@1), eval/pass@k, eval/response_length
    samples: list[dict[str, str]]  # the first few greedy replies: prompt, answer, reply, correct


def evaluate(rollout: RolloutPool, problems: list, cfg: Any, system_prompt: str = "",
             num_samples: int = 4) -> EvalResult:
    prompts = [Prompt(p.id, p.prompt, system_prompt) for p in problems]
    answers = {p.id: p.answer for p in problems}
    greedy = rollout.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_tokens=cfg.max_new_tokens))
    with Scorer({"accuracy": 1.0}, timeout_s=cfg.reward_timeout_s) as scorer:
        greedy_scores = scorer.score([(g.completions[0].text, answers[g.prompt.id]) for g in greedy.groups])
        correct = [s.parts.get("accuracy", 0.0) for s in greedy_scores]
        metrics = {
            "eval/accuracy": sum(correct) / max(1, len(problems)),
            "eval/response_length": sum(len(g.completions[0].token_ids) for g in greedy.groups)
            / max(1, len(greedy.groups)),
            "eval/failed": float(sum(not s.ok for s in greedy_scores)),
        }
        if cfg.pass_k > 1:
            spec = SamplingSpec(n=cfg.pass_k, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens)
            sampled = rollout.generate(prompts, spec)
            hits = [any(s.parts.get("accuracy", 0.0) > 0 for s in scorer.score(
                [(c.text, answers[g.prompt.id]) for c in g.completions])) for g in sampled.groups]
            metrics[f"eval/pass@{cfg.pass_k}"] = sum(hits) / max(1, len(problems))
    samples = [{"prompt": g.prompt.text, "answer": answers[g.prompt.id], "reply": g.completions[0].text,
                "correct": bool(c)} for g, c in zip(greedy.groups[:num_samples], correct)]
    return EvalResult(metrics, samples)
