"""Held-out evaluation through the rollout actors: greedy pass@1 and sampled pass@k.

Uses the same engines (and so the same weights) as training; needs no learner, so
`raygrpo stage=eval model.path=<dir>` evaluates any saved policy on its own. Replies are judged by
`eval.reward` (default `accuracy`: lenient extraction, verified with math-verify; `code_tests` for
code), scored with real deadlines: eval/accuracy is its mean over greedy replies, and a problem
counts for pass@k when one of its k samples scores 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from actors.scoring import Scorer
from actors.types import Prompt, SamplingSpec
from orchestration.cluster.pools import RolloutPool, score_request
from orchestration.train.producer import sampling_seed
from tasks.base import Problem, prompt_text


@dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/accuracy (greedy pass@1), eval/pass@k, eval/response_length
    samples: list[dict[str, Any]]  # the first few greedy replies: prompt, answer, reply, correct


def evaluate(rollout: RolloutPool, problems: list[Problem], cfg: Any, system_prompt: str = "",
             num_samples: int = 4) -> EvalResult:
    """`cfg` (`loop.eval_settings`): max_new_tokens, pass_k, temperature, reward (the judging function),
    reward_timeout_s, seed, format_reward ("" or the function of eval/format_rate), reward_settings,
    pass_env (see `Scorer`).
    Greedy and sampled replies come from one engine batch, so from one policy version."""
    by_id = {p.id: p for p in problems}
    greedy_spec = SamplingSpec(n=1, temperature=0.0, max_tokens=cfg.max_new_tokens)
    sampled_spec = SamplingSpec(n=cfg.pass_k, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens)
    seeds = [sampling_seed(cfg.seed, "eval", i) for i in range(len(problems))]  # the same draws at every evaluation
    prompts = [Prompt(p.id, p.prompt, system_prompt, p.answer, p.metadata) for p in problems]
    specs = [greedy_spec] * len(prompts)
    if cfg.pass_k > 1:
        prompts += [Prompt(f"{p.id}{SAMPLED}", p.prompt, system_prompt, p.answer, p.metadata) for p in problems]
        specs += [replace(sampled_spec, seed=seed) for seed in seeds]
    result = rollout.generate(prompts, specs)
    greedy = [g for g in result.groups if not g.prompt.id.endswith(SAMPLED)]
    sampled = [g for g in result.groups if g.prompt.id.endswith(SAMPLED)]
    problem = lambda g: by_id[g.prompt.id.removesuffix(SAMPLED)]  # noqa: E731
    fmt = cfg.format_reward
    with Scorer({cfg.reward: 1.0, **({fmt: 0.0} if fmt and fmt != cfg.reward else {})},
                timeout_s=cfg.reward_timeout_s, settings=cfg.reward_settings, pass_env=cfg.pass_env) as scorer:
        judged = [row[0] for row in scorer.score([score_request(g, problem(g)) for g in greedy])]
        values = [s.parts.get(cfg.reward, 0.0) for s in judged]
        metrics = {
            "eval/accuracy": sum(values) / max(1, len(problems)),
            "eval/response_length": sum(len(g.completions[0].token_ids) for g in greedy) / max(1, len(greedy)),
            "eval/failed": float(sum(not s.ok for s in judged)),
            "eval/policy_version": float(min((g.version for g in result.groups), default=0)),
        }
        metrics.update(tool_metrics([g.completions[0].info or {} for g in greedy]))
        if fmt:  # the share of greedy replies in the recipe's format (e.g. one think block, then the answer)
            metrics["eval/format_rate"] = sum(s.parts.get(fmt, 0.0) >= 1.0 for s in judged) / max(1, len(problems))
        if cfg.pass_k > 1:
            rows = scorer.score([score_request(g, problem(g)) for g in sampled])
            hits = [any(s.parts.get(cfg.reward, 0.0) >= 1.0 for s in row) for row in rows]
            metrics[f"eval/pass@{cfg.pass_k}"] = sum(hits) / max(1, len(problems))
    samples = [{"prompt": prompt_text(g.prompt.content), "answer": by_id[g.prompt.id].answer,
                "reply": g.completions[0].text, "correct": v >= 1.0,
                **({"trajectory": transcript(g.completions[0].turns)} if g.completions[0].turns is not None else {})}
               for g, v in zip(greedy[:num_samples], values)]
    return EvalResult(metrics, samples)


def tool_metrics(infos: list[dict[str, float]]) -> dict[str, float]:
    """Of multi-turn replies with tools (their `Completion.info`; {} when none called or could
    call one): eval/tool_call_rate, the share that called a tool at least once, and
    eval/well_formed_rate, the share of `<tool_call>` blocks that parsed."""
    if not any("tool_calls" in i for i in infos):
        return {}
    calls = sum(i.get("tool_calls", 0.0) for i in infos)
    bad = sum(i.get("tool_malformed", 0.0) for i in infos)
    return {"eval/tool_call_rate": sum(i.get("tool_calls", 0.0) > 0 for i in infos) / len(infos),
            "eval/well_formed_rate": calls / (calls + bad) if calls + bad else 0.0}


def transcript(turns: list[dict[str, str]]) -> str:
    """A trajectory's turns after the prompt, each visible: "[assistant] ...", "[tool] ..."."""
    return "\n".join(f"[{m['role']}] {m['content']}" for m in turns)


SAMPLED = "#sampled"  # id suffix of the pass@k copies of the held-out prompts
