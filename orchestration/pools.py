"""Driver-side handles of the rollout and reward actors, with their failure handling.

- RolloutPool shards prompts across engines. An actor that dies (or misses its deadline) is
  dropped, its prompts are re-generated on the survivors, and `needs_resync` tells the driver
  to rebuild the broadcast group without it: the step's data is never lost.
- RewardPool spreads groups over reward actors; a dead reward actor's share is retried on
  another. Per-sample failures (raise, timeout) come back as `failed` scores from the Scorer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.rollout import RolloutActor
from actors.scoring import Score, Scorer
from actors.types import GenerateResult, Group, Prompt, SamplingSpec, ScoreRequest
from tasks.base import Problem

log = logging.getLogger("raygrpo")


def _chunks(items: list, n: int) -> list[list]:
    """Split into n contiguous, nearly equal chunks (order preserved)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


class RolloutPool:
    def __init__(self, actors: list, timeout_s: float):
        """Wrap running rollout actors (see `start`)."""
        self.actors = list(actors)
        self.slots = list(range(len(self.actors)))  # each live actor's placement index (its colocated rank)
        self.timeout_s = timeout_s
        self.lost = 0  # actors dropped so far
        self.needs_resync = False
        # Held to change the actors and to queue work on them: a producer thread may drop an actor or
        # queue a generation while the driver syncs weights (see `WeightSync.push`).
        self.lock = threading.RLock()

    @classmethod
    def start(cls, options: list[dict[str, Any]], model: str, timeout_s: float,
              engine_bundles: list[list[int]] | None = None, **engine_kwargs: Any):
        """Start one RolloutActor per entry of `options` and wait until every engine is up."""
        remote = ray.remote(RolloutActor)
        seed = engine_kwargs.pop("seed", 0)
        bundles = engine_bundles or [[] for _ in options]
        actors = [remote.options(**opt).remote(model, seed=seed + i, engine_bundles=b, **engine_kwargs)
                  for i, (opt, b) in enumerate(zip(options, bundles))]
        ray.get([a.ready.remote() for a in actors])
        return cls(actors, timeout_s)

    def generate(self, prompts: list[Prompt], spec: SamplingSpec | list[SamplingSpec]) -> GenerateResult:
        """Every prompt's group, in prompt order (see `stream`)."""
        return GenerateResult.merge(self.stream(prompts, spec), prompts)

    def stream(self, prompts: list[Prompt], spec: SamplingSpec | list[SamplingSpec]) -> Iterator[GenerateResult]:
        """Each prompt's group as soon as an engine finishes it, surviving the loss of actors (not of
        all of them): an actor that dies, or when no engine yields anything for `timeout_s`, is
        dropped and its unfinished prompts are re-generated on the survivors. `spec`: one for all
        prompts, or one per prompt."""
        specs = dict(zip((p.id for p in prompts), spec if isinstance(spec, list) else [spec] * len(prompts)))
        pending = list(prompts)
        while pending:
            with self.lock:
                if not self.actors:
                    raise RuntimeError("every rollout actor has died")
                streams = {a.stream.remote(s, [specs[p.id] for p in s]): (a, {p.id: p for p in s})
                           for a, s in zip(self.actors, _chunks(pending, len(self.actors))) if s}
            pending = []
            while streams:
                ready, _ = ray.wait(list(streams), num_returns=1, timeout=self.timeout_s)
                for ref in ready or list(streams):  # none within the deadline: every silent actor is lost
                    actor, left = streams[ref]
                    try:
                        if not ready:
                            raise GetTimeoutError(f"no group within {self.timeout_s:g} s")
                        part = ray.get(next(ref))
                    except StopIteration:
                        del streams[ref]
                        continue
                    except (RayActorError, GetTimeoutError) as err:
                        log.error("rollout actor lost (%s); re-generating its %d unfinished prompts on the others",
                                  type(err).__name__, len(left))
                        self._drop(actor)
                        pending.extend(left.values())
                        del streams[ref]
                        continue
                    for gone in [g.prompt.id for g in part.groups] + part.dropped:
                        left.pop(gone, None)
                    yield part

    def _drop(self, actor) -> None:
        with self.lock:
            if actor not in self.actors:
                return
            del self.slots[self.actors.index(actor)]
            self.actors.remove(actor)
            self.lost += 1
            self.needs_resync = True
        ray.kill(actor, no_restart=True)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        with self.lock:
            return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]


class RewardPool:
    def __init__(self, options: list[dict[str, Any]], functions: dict[str, float], timeout_s: float):
        remote = ray.remote(Scorer)
        self.actors = [remote.options(**opt).remote(dict(functions), timeout_s) for opt in options]
        self.turn = 0

    def score(self, groups: list[Group], problems: dict[str, Problem]) -> list[list[Score]]:
        """Scores [P][G] for the groups, spreading whole groups over the reward actors."""
        requests = [score_request(g, problems[g.prompt.id]) for g in groups]
        jobs = [self.submit(chunk) for chunk in _chunks(requests, len(self.actors))]  # all running before any wait
        return [row for job in jobs for row in self.gather(job)]

    def submit(self, requests: list[ScoreRequest]) -> "ScoreJob":
        """Start scoring some groups on the next reward actor (round robin); `gather` waits."""
        actor = self.actors[self.turn % len(self.actors)]
        self.turn += 1
        return ScoreJob(actor.score.remote(requests) if requests else None, actor, requests)

    def gather(self, job: "ScoreJob") -> list[list[Score]]:
        """The job's scores [groups][G]; a dead reward actor's job is re-run on another."""
        while job.ref is not None:
            try:
                return ray.get(job.ref)
            except RayActorError:
                log.error("reward actor lost; re-scoring its %d groups on another", len(job.requests))
                if job.actor in self.actors:
                    self.actors.remove(job.actor)
                if not self.actors:
                    raise RuntimeError("every reward actor has died") from None
                job = self.submit(job.requests)
        return []


@dataclass
class ScoreJob:
    ref: ray.ObjectRef | None  # resolves to [groups][G] scores
    actor: Any
    requests: list[ScoreRequest]


def score_request(group: Group, problem: Problem) -> ScoreRequest:
    """What the reward functions see of one group: completions, reference answer, prompt, row."""
    return ScoreRequest([c.text for c in group.completions], problem.answer, problem.prompt, problem.metadata)
