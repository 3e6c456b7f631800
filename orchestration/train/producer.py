"""Producing a step's training data on the engines: generate, score, and (DAPO) re-sample —
in turn with the learner, or ahead of it under a staleness bound.

`rollout.max_staleness` k = 0: `take(step)` generates and scores the step's groups right then;
the loop is generate → score → learn → sync. k >= 1: `take(step)` first queues the productions
of steps step+1 … step+k on a background thread, so the engines generate them with the weights
they hold while the learner trains on `step`. A production for step s is queued only after the
weights of step s−k were loaded (the driver's sync is complete before the next `take`), so no
trained completion is more than k versions old; each group carries its version.

Rewards stream: the engines yield each group when its G completions are done and its scoring
starts at once on a reward actor, while the rest of the batch decodes. Held-out evaluation is a
production too: with k >= 1 it runs on the engines while the learner trains.

Sampling is a function of (weights, run seed, step, round, prompt index, sample index), not of an
engine's history: each prompt's request carries its own seed (`sampling_seed`; vLLM gives
sample i of a request seed + i), so a re-generated prompt, a replaced engine or a resumed run
draws the same completions from the same weights.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from actors.scoring import Score
from actors.types import Group, Prompt, SamplingSpec
from learner.grpo import has_variance
from orchestration.cluster.pools import RewardPool, RolloutPool, score_request
from tasks.base import Problem, Task, stable_seed


@dataclass
class Sampled:
    """One step's scored groups (informative ones only under dynamic sampling)."""

    groups: list[Group]
    scores: list[list[Score]]  # [P][G]
    dropped: list[str]  # prompt ids over the length limit
    metrics: dict[str, float]  # sampling/*, time/generate, time/reward
    problems: dict[str, Problem] = field(default_factory=dict)  # by prompt id: answer and row of each group


class Producer:
    def __init__(self, cfg: Any, task: Task, rollout: RolloutPool, rewards: RewardPool, spec: SamplingSpec,
                 produced: dict[int, Sampled] | None = None):
        """`produced`: steps already generated and scored (restored from a checkpoint)."""
        self.cfg, self.task, self.rollout, self.rewards, self.spec = cfg, task, rollout, rewards, spec
        self.ahead = cfg.rollout.max_staleness
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="producer") if self.ahead else None
        self.queued: dict[int, Future] = {}
        for step, sampled in (produced or {}).items():
            self.queued[step] = Future()
            self.queued[step].set_result(sampled)
        self.evals: list[Future] = []

    def take(self, step: int) -> Sampled:
        """The step's scored groups; with k >= 1, first queue the productions up to step + k."""
        if self.thread is None:
            return self.queued.pop(step).result() if step in self.queued else self.produce(step)
        for s in range(step, min(step + self.ahead, self.cfg.steps - 1) + 1):
            if s not in self.queued:
                self.queued[s] = self.thread.submit(self.produce, s)
        return self.queued.pop(step).result()

    def evaluate(self, run: Callable[[], Any]) -> None:
        """Evaluate the weights the engines hold now: at once with k = 0; else queued before the
        next production (so before the next weights load) and run while the learner trains."""
        future: Future = Future()
        if self.thread is None:
            future.set_result(run())
        else:
            future = self.thread.submit(run)
        self.evals.append(future)

    def produced(self) -> dict[int, Sampled]:
        """Every queued production, waited for: what a checkpoint keeps of the steps ahead."""
        return {step: future.result() for step, future in sorted(self.queued.items())}

    def finished_evals(self, wait: bool = False) -> list[Any]:
        """Results of the evaluations done so far (all of them with `wait`), in order."""
        done = []
        while self.evals and (wait or self.evals[0].done()):
            done.append(self.evals.pop(0).result())
        return done

    def close(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=False, cancel_futures=True)

    def produce(self, step: int) -> Sampled:
        """Generate and score the step's groups. With DAPO's dynamic sampling, groups whose rewards
        are all equal are dropped and further prompts drawn, for at most `algo.max_sampling_rounds`."""
        want, dynamic = self.cfg.rollout.prompts_per_step, self.cfg.algo.dynamic_sampling
        out = Sampled([], [], [], {})
        generated = rounds = 0
        seconds = {"time/generate": 0.0, "time/reward": 0.0}
        while len(out.groups) < want and rounds < (self.cfg.algo.max_sampling_rounds if dynamic else 1):
            problems = self.task.train_batch(step, want - len(out.groups), rounds)
            out.problems.update((p.id, p) for p in problems)
            specs = [replace(self.spec, seed=sampling_seed(self.cfg.seed, step, rounds, i)) for i in range(len(problems))]
            groups, scores, dropped = self._generate_and_score(problems, specs, seconds)
            for group, row in zip(groups, scores):
                if not dynamic or has_variance(s.reward for s in row if s.ok):
                    out.groups.append(group)
                    out.scores.append(row)
            out.dropped += dropped
            generated += len(groups)
            rounds += 1
        out.metrics = {"sampling/rounds": float(rounds), "sampling/generated_groups": float(generated),
                       "sampling/dropped_groups": float(generated - len(out.groups)), **seconds}
        return out

    def _generate_and_score(self, problems: list[Problem], specs: list[SamplingSpec], seconds: dict[str, float]):
        """One round: each group's scoring starts as soon as the engine yields it. Returns groups,
        scores [P][G] (in prompt order) and the dropped prompt ids; adds to generate/reward seconds."""
        by_id = {p.id: p for p in problems}
        prompts = [Prompt(p.id, p.prompt, self.cfg.task.system_prompt, p.answer, p.metadata) for p in problems]
        start = time.perf_counter()
        groups, jobs, dropped = [], [], []
        for part in self.rollout.stream(prompts, specs):
            dropped += part.dropped
            for group in part.groups:
                groups.append(group)
                jobs.append(self.rewards.submit([score_request(group, by_id[group.prompt.id])]))
        generated = time.perf_counter()
        scores = [self.rewards.gather(job)[0] for job in jobs]
        seconds["time/generate"] += generated - start
        seconds["time/reward"] += time.perf_counter() - generated  # what scoring adds after the last group
        order = {p.id: i for i, p in enumerate(problems)}
        ranked = sorted(zip(groups, scores), key=lambda gs: order[gs[0].prompt.id])
        return [g for g, _ in ranked], [s for _, s in ranked], dropped


def collect_evals(producer: Producer, evals: list[Any], wait: bool = False) -> dict[str, float]:
    """Metrics of the evaluations finished so far (eval/policy_version: the weights they judged)."""
    metrics: dict[str, float] = {}
    for result in producer.finished_evals(wait):
        evals.append(result)
        metrics.update(result.metrics)
    return metrics


def sampling_seed(run_seed: int, *where: object) -> int:
    """The sampling seed of one request, from the run seed and where it is (step, round, prompt
    index; or "eval", prompt index); below 2^31 so that seed + sample index fits any engine."""
    return stable_seed("sample", run_seed, *where) % (1 << 31)
