"""The training loop, top to bottom: prompts → generate → score → advantages → update → sync → log
(generation and scoring live in `producer.py`, in turn with the learner or ahead of it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from actors.types import SamplingSpec
from learner.batch import TrainBatch, pad_to_multiple
from learner.group import LearnerGroup
from learner.grpo import has_variance
from orchestration.cluster.launch import Actors, pass_env, start_actors, start_rollout
from orchestration.cluster.placement import Placement
from orchestration.config.recipe import reward_settings
from orchestration.report.metrics import RunLogger, Timer
from orchestration.report.reasoning import reasoning_metrics
from orchestration.train.batching import build_batch, overlong_shaping
from orchestration.train.checkpoint import config_dict
from orchestration.train.evaluation import EvalResult, evaluate, transcript
from orchestration.train.lifecycle import Lifecycle
from orchestration.train.producer import Producer, Sampled, collect_evals
from tasks.base import Task, prompt_text

log = logging.getLogger("raygrpo")


def eval_settings(cfg: Any, midway: bool = False) -> SimpleNamespace:
    e = cfg.eval
    pass_k = 1 if midway and not e.pass_k_midway else e.pass_k
    return SimpleNamespace(max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens, pass_k=pass_k,
                           temperature=e.temperature, reward=e.reward, reward_timeout_s=cfg.reward.timeout_s,
                           seed=cfg.seed, format_reward=e.format_reward, reward_settings=reward_settings(cfg),
                           pass_env=pass_env(cfg))


def train(cfg: Any, actors: Actors, logger: RunLogger, task: Task, life: Lifecycle) -> list[EvalResult]:
    """Run GRPO steps from `life.state.step` to `cfg.steps` with held-out evaluation; returns every
    evaluation of the run (a resumed run's earlier ones included)."""
    r, every, state = cfg.rollout, cfg.eval.every_n_steps, life.state
    test = task.test_set()
    evaluating = cfg.eval.enabled and bool(test)

    def evaluate_now(midway: bool = False) -> EvalResult:
        return evaluate(actors.rollout, test, eval_settings(cfg, midway), cfg.task.system_prompt)

    spec = SamplingSpec(n=r.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                        max_tokens=r.max_new_tokens, stop=tuple(r.stop))
    producer = Producer(cfg, task, actors.rollout, actors.rewards, spec, produced=state.queued)
    if state.step == 0:
        state.pending.update(task.stats())  # logged with the first step
    try:
        for step in range(state.step, cfg.steps):
            life.before_step(step)
            timer = Timer()
            if evaluating and (step == 0 or (every and step % every == 0)):
                with timer("eval"):  # the engines evaluate while the learner trains when k >= 1
                    producer.evaluate(lambda midway=step > 0: evaluate_now(midway))
            with timer("wait_rollout"):
                sampled = producer.take(step)
            state.pending.update(collect_evals(producer, state.evals))
            if cfg.logger.samples_every_n_steps and step % cfg.logger.samples_every_n_steps == 0:
                logger.log_samples(step, sample_rows(sampled, cfg.logger.samples_prompts))
            learner_metrics = None
            if not sampled.groups:  # dynamic sampling found no informative group: nothing to learn from
                log.warning("step %d: no informative group after %d rounds; skipping the update", step,
                            sampled.metrics["sampling/rounds"])
                logger.log(step, {**state.pending, **sampled.metrics, **timer.breakdown()})
            else:
                trained_from = actors.sync.version  # the learner's weights: what staleness is measured from
                with timer("learner"):
                    actors.to_learner()
                    batch, rewards, padded = make_batch(cfg, sampled, actors.learner)
                    learner_metrics = actors.learner.train_step(batch)
                with timer("sync"), actors.handover():
                    actors.sync.push(step + 1)  # admits new engines and rebuilds the group when it changed
                metrics = step_metrics(trained_from, sampled, rewards, learner_metrics, timer, padded, actors,
                                       cfg.reasoning)
                logger.log(step, {**metrics, **state.pending})
            state.pending = {}
            life.after_step(step, producer, learner_metrics)
        if evaluating:
            producer.evaluate(evaluate_now)
            final = collect_evals(producer, state.evals, wait=True)
            logger.log(cfg.steps, {**final, **state.pending}, advance=False)
    finally:
        producer.close()
    return state.evals


def sample_rows(sampled: Sampled, num_prompts: int) -> list[dict[str, Any]]:
    """The first `num_prompts` groups of a step, one row per completion, for the samples table."""
    rows = []
    for group, scores in list(zip(sampled.groups, sampled.scores))[:num_prompts]:
        problem = sampled.problems[group.prompt.id]
        for completion, score in zip(group.completions, scores):
            rows.append({"prompt_id": group.prompt.id, "source": problem.source, "prompt": prompt_text(problem.prompt),
                         "completion": completion.text, "answer": problem.answer,
                         "reward": score.reward if score.ok else None, "status": score.status,
                         "error": score.error, **score.parts, "finish_reason": completion.finish_reason,
                         "tokens": len(completion.token_ids), "policy_version": group.version,
                         **({"trajectory": transcript(completion.turns)} if completion.turns is not None else {})})
    return rows


def make_batch(cfg: Any, sampled: Sampled, learner: LearnerGroup) -> tuple[TrainBatch, torch.Tensor, int]:
    """Rewards (+ overlong shaping, − β·KL when the KL lives in the reward) → advantages → batch,
    padded with zero-weight rows to split evenly over ranks × mini-batches."""
    a = cfg.algo
    shaping = overlong_shaping(sampled.groups, cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_factor)
    if a.kl_in == "reward" and a.kl_coef > 0:  # needs the sequences first; advantages follow
        sequences, _ = build_batch(sampled.groups, sampled.scores, a)
        kl = torch.tensor(learner.reference_kl(sequences, a.kl_estimator)).reshape(shaping.shape)
        shaping = shaping - a.kl_coef * kl
    batch, rewards = build_batch(sampled.groups, sampled.scores, a, shaping)
    batch, padded = pad_to_multiple(batch, cfg.learner.num_ranks * cfg.learner.num_minibatches)
    return batch, rewards, padded


def save_outputs(cfg: Any, actors: Actors) -> Path:
    """The final policy as an HF directory in the run directory, and what the engines last loaded."""
    out = Path(cfg.output_dir)
    policy = out / "policy"
    actors.learner.save_pretrained(str(policy.resolve()), merge=cfg.export.merge)  # LoRA: adapter, or merged too
    sync = {"version": actors.sync.version, "dtype": actors.sync.dtype, "bucket_bytes": actors.sync.bucket_bytes,
            "engine_checksums": actors.sync.last_checksums}
    (out / "sync.json").write_text(json.dumps(sync, indent=1))
    return policy


def trajectory_metrics(completions: list) -> dict[str, float]:
    """`env/*` for multi-turn trajectories (nothing for single replies): turns per trajectory (mean,
    max), tool calls, errors, timeouts and malformed calls per trajectory, tokens by role, and the
    share of trajectories cut by each limit."""
    infos = [c.info for c in completions if c.info is not None]
    if not infos:
        return {}
    n = len(infos)
    total = lambda key: sum(i.get(key, 0.0) for i in infos)  # noqa: E731
    out = {"env/turns_mean": total("turns") / n, "env/turns_max": max(i.get("turns", 0.0) for i in infos),
           "env/policy_tokens_mean": total("policy_tokens") / n, "env/env_tokens_mean": total("env_tokens") / n}
    for key in ("tool_calls", "tool_errors", "tool_timeouts", "tool_malformed", "env_errors"):
        out[f"env/{key}_per_trajectory"] = total(key) / n
    calls = total("tool_calls") + total("tool_malformed")
    out["env/well_formed_call_rate"] = total("tool_calls") / calls if calls else float("nan")
    for cut in ("max_turns", "max_total_tokens", "turn_length"):
        out[f"env/cut_{cut}"] = total(f"cut_{cut}") / n
    return out


def step_metrics(version: int, sampled: Sampled, rewards: torch.Tensor, learner: dict[str, float], timer: Timer,
                 padded: int, actors: Actors, reasoning: Any) -> dict[str, float]:
    """Everything a user watches per step, named `area/metric` (`reasoning/*`: see reasoning_metrics)."""
    scores = sampled.scores
    completions = [c for g in sampled.groups for c in g.completions]
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
    ok = ~rewards.isnan()
    flat = [s for row in scores for s in row]
    parts: dict[str, list[float]] = {}
    for s in flat:
        if s.ok:
            for name, value in s.parts.items():
                parts.setdefault(name, []).append(value)
    zero_var = [not has_variance(row) for row in rewards.tolist()]
    times = {**timer.breakdown(), **{k: v for k, v in sampled.metrics.items() if k.startswith("time/")}}
    # versions behind the weights the learner trained (`version`: a step whose update was skipped pushed none)
    staleness = torch.tensor([float(version - g.version) for g in sampled.groups])
    m = {
        "reward/mean": float(rewards[ok].mean()) if ok.any() else float("nan"),
        "reward/std": float(rewards[ok].std()) if ok.sum() > 1 else 0.0,
        "reward/failed": float((~ok).sum()),
        "reward/zero_variance_groups": sum(zero_var) / max(1, len(zero_var)),
        **{f"reward/{k}": sum(v) / len(v) for k, v in parts.items()},
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated": sum(c.finish_reason == "length" for c in completions) / max(1, len(completions)),
        "rollout/prompts_dropped": float(len(sampled.dropped)),
        "rollout/actors_lost": float(actors.rollout.lost),
        "rollout/actors_replaced": float(actors.rollout.replaced),
        "rollout/num_actors": float(len(actors.rollout.actors)),
        "rollout/policy_version": float(min(g.version for g in sampled.groups)),
        "rollout/staleness_mean": float(staleness.mean()),
        "rollout/staleness_max": float(staleness.max()),
        **{k: v for k, v in sampled.metrics.items() if not k.startswith("time/")},
        **reasoning_metrics([c.text for c in completions], [len(c.token_ids) for c in completions],
                            markers=reasoning.reflection_markers, open=reasoning.open_tag, close=reasoning.close_tag),
        **trajectory_metrics(completions),
        "learner/padding_sequences": float(padded),
        **{f"learner/{k}": v for k, v in learner.items()},
        "perf/tokens_per_s": float(lengths.sum()) / max(times["time/generate"], 1e-9),
        "time/sync_wait_engines": actors.sync.waited_s,  # part of time/sync: generations in flight finishing
        **times,
    }
    if "accuracy" in parts:
        m["reward/accuracy"] = sum(parts["accuracy"]) / len(parts["accuracy"])
        shaping = [s for s in flat if s.ok and any(v > 0 for k, v in s.parts.items() if k != "accuracy")]
        # reward hacking in miniature: credit from the other terms on wrong answers
        m["reward/other_terms_without_accuracy"] = sum(s.parts.get("accuracy", 0.0) <= 0 for s in shaping) / max(
            1, len(flat))
    return m


def run_train(cfg: Any, placement: Placement, task: Task, resume_from: Path | None = None) -> Path:
    """Train (from `resume_from`, a checkpoint, when given), save the policy, write curves and the
    report; returns the run directory. Raises RunStopped when stopped early (a checkpoint written)."""
    import time

    from orchestration.report import summary

    start = time.time()
    out = Path(cfg.output_dir)
    config = config_dict(cfg)
    life = Lifecycle(cfg, config, resume_from)
    logger = RunLogger(cfg.output_dir, config, cfg.logger.wandb, cfg.steps, cfg.logger.progress,
                       resume_step=life.state.step if resume_from else None, wandb_id=life.state.wandb_id)
    try:
        with life.stop, start_actors(cfg, placement) as actors:  # stopped on the way out, however it ends
            life.attach(actors, logger)
            evals = train(cfg, actors, logger, task, life)
            save_outputs(cfg, actors)
    finally:
        logger.close()
        if life.control is not None:
            life.control.close()
    summary.plot_curves(summary.load_metrics(out), out / "curves.png")
    first, last = (evals[0], evals[-1]) if len(evals) >= 2 else (None, None)
    table = summary.before_after(first.metrics, last.metrics) if first else []
    summary.write_report(out, config, table, first.samples if first else [], last.samples if last else [],
                        time.time() - start)
    if table:
        summary.print_summary(table, out)
    return out


def run_eval(cfg: Any, placement: Placement, task: Task) -> dict[str, float]:
    """Evaluate `model.path` alone (no learner) on the task's held-out set; prints and logs the metrics."""
    with Actors(rollout=start_rollout(cfg, placement)) as actors:
        result = evaluate(actors.rollout, task.test_set(), eval_settings(cfg), cfg.task.system_prompt)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({"model": cfg.model.path, **result.metrics, "samples": result.samples},
                                              indent=1))
    for k, v in result.metrics.items():
        print(f"{k:<24} {v:.4f}")
    return result.metrics
