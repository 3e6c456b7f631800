"""Stage `rejection_sampling`: sample K completions per prompt from a policy, keep the ones that pass
the rules, and write them as an SFT data set (DeepSeek-R1's second SFT round, section 2.3.3).

The rules (`rejection.*`), in the order a completion is judged, each rejection counted by reason:
the reward was scored (not failed) → the reply finished (not truncated, unless `allow_truncated`) → its length is within
[min_tokens, max_tokens] → every part named in `min_parts` reaches its minimum (correct answer,
format, language consistency) → its 4-gram repetition is at most `max_repetition` → it is not a
duplicate (identical once whitespace is removed) of a reply already kept for the prompt → at most
`max_per_prompt` are kept per prompt. `select` is pure; `run` drives the engines and reward actors.

Output, under `output_dir`: `data.jsonl`, one row per kept reply `{prompt, response, answer,
provenance: {policy, prompt_id, sample, reward, parts, tokens, finish_reason}}` (the columns
`sft.*` reads), and `rejection.json` with the counts.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestration.report.reasoning import repetition
from tasks.base import PromptContent

log = logging.getLogger("raygrpo")


@dataclass(frozen=True)
class Candidate:
    """One sampled reply with its scores."""

    prompt_id: str
    prompt: PromptContent
    answer: str
    text: str
    tokens: int
    finish_reason: str  # "stop" | "length" | "abort"
    reward: Optional[float]  # None: scoring failed
    parts: dict[str, float] = field(default_factory=dict)
    sample: int = 0  # index within its prompt's K samples


@dataclass(frozen=True)
class Rules:
    min_parts: dict[str, float]
    min_tokens: int = 1
    max_tokens: int = 0  # 0: no bound
    max_repetition: float = 1.0
    max_per_prompt: int = 0  # 0: no bound
    allow_truncated: bool = False


def verdict(c: Candidate, rules: Rules) -> str:
    """Why `c` is rejected ("" when it passes every rule but de-duplication and the per-prompt cap)."""
    if c.reward is None:
        return "reward_failed"
    if c.finish_reason != "stop" and not (rules.allow_truncated and c.finish_reason == "length"):
        return "truncated"
    if c.tokens < rules.min_tokens:
        return "too_short"
    if rules.max_tokens and c.tokens > rules.max_tokens:
        return "too_long"
    for name, least in rules.min_parts.items():
        if c.parts.get(name, float("-inf")) < least:
            return f"{name}_below_{least:g}"
    if repetition(c.text) > rules.max_repetition:
        return "repetition"
    return ""


def select(candidates: list[Candidate], rules: Rules) -> tuple[list[Candidate], Counter]:
    """The kept candidates (in input order) and the count of rejections by reason."""
    kept: list[Candidate] = []
    reasons: Counter = Counter()
    seen: dict[str, set[str]] = {}
    for c in candidates:
        reason = verdict(c, rules)
        if not reason:
            texts = seen.setdefault(c.prompt_id, set())
            key = "".join(c.text.split())
            if key in texts:
                reason = "duplicate"
            elif rules.max_per_prompt and len(texts) >= rules.max_per_prompt:
                reason = "over_max_per_prompt"
            else:
                texts.add(key)
                kept.append(c)
                continue
        reasons[reason] += 1
    return kept, reasons


def rules_of(cfg: Any) -> Rules:
    r = cfg.rejection
    return Rules(dict(r.min_parts), r.min_tokens, r.max_tokens or cfg.rollout.max_new_tokens, r.max_repetition,
                 r.max_per_prompt, r.allow_truncated)


def row(c: Candidate, policy: str) -> dict[str, Any]:
    """The SFT row of a kept reply, with where it came from."""
    prompt = c.prompt if isinstance(c.prompt, str) else [dict(m) for m in c.prompt]
    return {"prompt": prompt, "response": c.text, "answer": c.answer,
            "provenance": {"policy": policy, "prompt_id": c.prompt_id, "sample": c.sample, "reward": c.reward,
                           "parts": c.parts, "tokens": c.tokens, "finish_reason": c.finish_reason}}


def run(cfg: Any, placement: Any, task: Any) -> Path:
    """Sample, score, select, write; returns the data file."""
    from dataclasses import replace

    from actors.types import Prompt, SamplingSpec
    from orchestration.cluster.launch import Actors, start_rewards, start_rollout
    from orchestration.report.reasoning import reasoning_metrics
    from orchestration.stages.sft_data import write_jsonl
    from orchestration.train.producer import sampling_seed

    r, x, out = cfg.rollout, cfg.rejection, Path(cfg.output_dir)
    problems = draw(task, x.num_prompts, r.prompts_per_step)
    by_id = {p.id: p for p in problems}
    spec = SamplingSpec(n=x.samples_per_prompt, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                        max_tokens=r.max_new_tokens, stop=tuple(r.stop))
    specs = [replace(spec, seed=sampling_seed(cfg.seed, "rejection", i)) for i in range(len(problems))]
    with Actors() as actors:  # both pools stopped once the replies are scored, however it ends
        actors.rollout = start_rollout(cfg, placement)
        actors.rewards = start_rewards(cfg, placement)
        prompts = [Prompt(p.id, p.prompt, cfg.task.system_prompt) for p in problems]
        result = actors.rollout.generate(prompts, specs)
        scores = actors.rewards.score(result.groups, by_id)
    candidates = [Candidate(g.prompt.id, by_id[g.prompt.id].prompt, by_id[g.prompt.id].answer, c.text,
                            len(c.token_ids), c.finish_reason, s.reward if s.ok else None, dict(s.parts), i)
                  for g, row_scores in zip(result.groups, scores) for i, (c, s) in enumerate(zip(g.completions, row_scores))]
    kept, reasons = select(candidates, rules_of(cfg))
    path = write_jsonl([row(c, cfg.model.path) for c in kept], out / "data.jsonl")
    stats = {"policy": cfg.model.path, "prompts": len(problems), "prompts_dropped": len(result.dropped),
             "candidates": len(candidates), "kept": len(kept), "prompts_with_kept": len({c.prompt_id for c in kept}),
             "rejected": dict(reasons.most_common()),
             **reasoning_metrics([c.text for c in kept], [c.tokens for c in kept], markers=cfg.reasoning.reflection_markers,
                                 open=cfg.reasoning.open_tag, close=cfg.reasoning.close_tag)}
    (out / "rejection.json").write_text(json.dumps(stats, indent=1))
    log.info("rejection sampling: kept %d of %d replies (%d of %d prompts); rejected %s", len(kept), len(candidates),
             stats["prompts_with_kept"], len(problems), dict(reasons.most_common()))
    if not kept:
        raise RuntimeError(f"rejection sampling kept no reply of {len(candidates)} (rejected: {dict(reasons)}); "
                           f"loosen rejection.* or sample a better policy")
    return path


def draw(task: Any, n: int, per_step: int) -> list[Any]:
    """The first `n` training problems of the task's stream, `per_step` per step (ids made unique)."""
    problems = []
    step = 0
    while len(problems) < n:
        problems += task.train_batch(step, min(per_step, n - len(problems)))
        step += 1
    return problems
