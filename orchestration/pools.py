"""Driver-side handles of the rollout and reward actors, with their failure handling.

- RolloutPool shards prompts across engines. An actor that dies (or misses its deadline) is
  dropped, its prompts are re-generated on the survivors, and `needs_resync` tells the driver
  to rebuild the broadcast group without it: the step's data is never lost.
- RewardPool spreads groups over reward actors; a dead reward actor's share is retried on
  another. Per-sample failures (raise, timeout) come back as `failed` scores from the Scorer.
"""

from __future__ import annotations

import logging
from typing import Any

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

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> GenerateResult:
        """Generate every prompt's group, surviving the loss of actors (not of all of them)."""
        pending, result = list(prompts), GenerateResult(groups=[], dropped=[])
        while pending:
            if not self.actors:
                raise RuntimeError("every rollout actor has died")
            refs = {a.generate.remote(s, spec): (a, s) for a, s in zip(self.actors, _chunks(pending, len(self.actors)))
                    if s}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)  # one deadline for all
            pending = []
            for ref, (actor, shard) in refs.items():
                try:
                    if ref not in ready:
                        raise GetTimeoutError(f"no reply within {self.timeout_s:g} s")
                    part = ray.get(ref)
                except (RayActorError, GetTimeoutError) as err:
                    log.error("rollout actor lost (%s); re-generating its %d prompts on the others",
                              type(err).__name__, len(shard))
                    self._drop(actor)
                    pending.extend(shard)
                    continue
                result.groups.extend(part.groups)
                result.dropped.extend(part.dropped)
        order = {p.id: i for i, p in enumerate(prompts)}
        result.groups.sort(key=lambda g: order[g.prompt.id])
        return result

    def _drop(self, actor) -> None:
        del self.slots[self.actors.index(actor)]
        self.actors.remove(actor)
        ray.kill(actor, no_restart=True)
        self.lost += 1
        self.needs_resync = True

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]


class RewardPool:
    def __init__(self, options: list[dict[str, Any]], functions: dict[str, float], timeout_s: float):
        remote = ray.remote(Scorer)
        self.actors = [remote.options(**opt).remote(dict(functions), timeout_s) for opt in options]

    def score(self, groups: list[Group], problems: dict[str, Problem]) -> list[list[Score]]:
        """Scores [P][G] for the groups, spreading whole groups over the reward actors."""
        requests = [score_request(g, problems[g.prompt.id]) for g in groups]
        shards = _chunks(list(range(len(groups))), len(self.actors))
        out: list[list[Score]] = [[] for _ in groups]
        todo = [(a, s) for a, s in zip(self.actors, shards) if s]
        while todo:
            refs = [(a.score.remote([requests[i] for i in s]), a, s) for a, s in todo]
            todo = []
            for ref, actor, shard in refs:
                try:
                    rows = ray.get(ref)
                except RayActorError:
                    log.error("reward actor lost; re-scoring its %d groups on another", len(shard))
                    if actor in self.actors:
                        self.actors.remove(actor)
                    if not self.actors:
                        raise RuntimeError("every reward actor has died") from None
                    todo.append((self.actors[0], shard))
                    continue
                for i, row in zip(shard, rows):
                    out[i] = row
        return out


def score_request(group: Group, problem: Problem) -> ScoreRequest:
    """What the reward functions see of one group: completions, reference answer, prompt, row."""
    return ScoreRequest([c.text for c in group.completions], problem.answer, problem.prompt, problem.metadata)
