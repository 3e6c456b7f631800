"""Driver-side handles of the rollout and reward actors: failure handling, healing, resizing.

RolloutPool — engines in three stages: *joining* (actor started, engine loading), *fresh* (engine
up, not yet given the learner's weights) and *serving* (`actors`: the only ones `stream` uses).
- An actor that dies (or misses `timeout_s` in `stream`) is dropped, its unfinished prompts are
  re-generated on the survivors (the step's data is never lost), and a replacement starts in the
  background to bring the pool back to `target`: on a freed placement slot first (with
  `topology.colocate`, the dead actor's own slot, which pairs it with learner rank `slot`), else
  on a new one from `more(slot)`.
- `resize(n)` changes `target` without blocking: growing starts joiners; shrinking takes the
  newest engines out of service at once, and they are shut down once their queued work is done.
- `admit()` (run by `WeightSync.push`) moves joiners whose engine is up to *fresh*, restarts the
  ones that died while starting (at most MAX_START_ATTEMPTS tries per slot) and shuts down retired
  engines that finished. Any change of members sets `needs_resync`; the push then forms a new
  broadcast group, loads the weights into every member, and `promote` puts the fresh engines into
  service: no engine serves before it holds the learner's weights.
- Lock discipline: `lock` (re-entrant) is held to change the members and to queue work on them.
  Producer threads queue generations under it; `WeightSync.push` holds it from admitting to
  queueing `receive_weights`, so no generation is queued between an engine's join and its load.
- Counters: `lost` (started engines dropped: dead, hung or failed a sync), `replaced`
  (replacements that went into service), `failed_starts` (joiners that died or were late).

RewardPool spreads groups over reward actors; a dead reward actor's share is re-scored on another
and a replacement starts on its placement. Per-sample failures (raise, timeout) come back as
`failed` scores from the Scorer.

`stop_actors` shuts engines down gracefully (vLLM stops its engine processes) before killing them;
both pools' `shutdown` stops every actor they hold (see `launch.Actors.shutdown`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.rollout import RolloutActor
from actors.scoring import Score, Scorer
from actors.spec import EngineSpec
from actors.types import GenerateResult, Group, Prompt, SamplingSpec, ScoreRequest
from tasks.base import Problem

log = logging.getLogger("raygrpo")

MAX_START_ATTEMPTS = 3  # tries to start an engine on one slot before giving up (until the next resize or loss)
MAX_SCORE_ATTEMPTS = 3  # reward actors a job may be tried on before the step fails
SHUTDOWN_GRACE_S = 10.0  # for an engine to stop its processes before its actor is killed

More = Callable[[int], "tuple[dict[str, Any], list[int]]"]  # slot -> (Ray actor options, engine bundles)


def _chunks(items: list, n: int) -> list[list]:
    """Split into n contiguous, nearly equal chunks (order preserved)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def _why(err: BaseException) -> str:
    """A one-line reason from an exception (Ray's carry whole tracebacks)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1][:200]}" if lines else type(err).__name__


def stop_actors(actors: list, grace_s: float = SHUTDOWN_GRACE_S, method: str = "shutdown") -> None:
    """Ask each actor to stop its own processes (`method`, after its queued work), wait up to
    `grace_s`, then kill them all."""
    refs = []
    for actor in actors:
        try:
            refs.append(getattr(actor, method).remote())
        except Exception:  # noqa: BLE001 - a test double without `method`, or a dead handle
            pass
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    for actor in actors:
        ray.kill(actor, no_restart=True)


class Launcher:
    """Starts RolloutActors on placement slots: slot i has fixed Ray options, engine bundles and seed
    (`spec` with seed + i and the slot's bundles). `actor_kwargs`: keyword arguments for `actor_cls`
    beyond the spec (a test double's own)."""

    def __init__(self, actor_cls: type, spec: EngineSpec, placements: list[tuple[dict[str, Any], list[int]]],
                 more: More | None, actor_kwargs: dict[str, Any]):
        self.remote = ray.remote(actor_cls)
        self.spec, self.placements, self.more = spec, list(placements), more
        self.initial = len(self.placements)
        self.actor_kwargs = dict(actor_kwargs)

    def start(self, slot: int):
        """A new actor on `slot` (placing new slots through `more`); returns at once."""
        while slot >= len(self.placements):
            if self.more is None:
                raise ValueError(f"no placement for rollout slot {slot}: the pool was started without `more`")
            self.placements.append(self.more(len(self.placements)))
        options, bundles = self.placements[slot]
        spec = replace(self.spec, seed=self.spec.seed + slot, engine_bundles=tuple(bundles))
        return self.remote.options(**options).remote(spec, **self.actor_kwargs)

    def can_place(self, slot: int) -> bool:
        return slot < len(self.placements) or self.more is not None

    def release(self) -> None:
        """Remove the placement groups made by `more` (the initial ones belong to the caller)."""
        from ray.util.placement_group import remove_placement_group

        for options, _ in self.placements[self.initial:]:
            group = getattr(options.get("scheduling_strategy"), "placement_group", None)
            if group is not None:
                remove_placement_group(group)
        del self.placements[self.initial:]


@dataclass
class Joiner:
    """An engine on its way into service: started, then up (fresh) until its first weight sync."""

    actor: Any
    slot: int
    ready: ray.ObjectRef
    replacement: bool  # started for a lost engine (counted in `replaced` once it serves)
    attempt: int = 1
    started: float = field(default_factory=time.monotonic)


class RolloutPool:
    def __init__(self, actors: list, timeout_s: float, *, launcher: Launcher | None = None,
                 colocated: bool = False, start_timeout_s: float = 900.0):
        """Wrap running rollout actors (see `start`; without a launcher nothing is replaced or added)."""
        self.actors = list(actors)  # serving
        self.slots = list(range(len(self.actors)))  # each serving actor's placement slot (its colocated rank)
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.target = len(self.actors)
        self.launcher, self.colocated = launcher, colocated
        self.joining: list[Joiner] = []  # engines starting
        self.fresh: list[Joiner] = []  # engines up, waiting for their first weights
        self.retiring: list[tuple[Any, int, ray.ObjectRef]] = []  # (actor, slot, ref done when its work is)
        self.lost = 0
        self.replaced = 0
        self.failed_starts = 0
        self.needs_resync = False
        self.lock = threading.RLock()

    @classmethod
    def start(cls, options: list[dict[str, Any]], spec: EngineSpec, timeout_s: float,
              engine_bundles: list[list[int]] | None = None, more: More | None = None, *,
              actor_cls: type = RolloutActor, start_timeout_s: float = 900.0, **actor_kwargs: Any):
        """Start one actor per entry of `options` (slot i; see `Launcher`) and wait until every engine
        is up (if one fails, the others are stopped). `more(slot)` places slots beyond these (see
        `placement.extra_rollout_slot`) for growth and replacements."""
        placements = list(zip(options, engine_bundles or [[] for _ in options]))
        launcher = Launcher(actor_cls, spec, placements, more, actor_kwargs)
        actors = [launcher.start(slot) for slot in range(len(options))]
        try:
            ray.get([a.ready.remote() for a in actors])
        except BaseException:
            stop_actors(actors)
            raise
        return cls(actors, timeout_s, launcher=launcher, colocated=spec.colocated, start_timeout_s=start_timeout_s)

    # ---- generation

    def generate(self, prompts: list[Prompt], spec: SamplingSpec | list[SamplingSpec]) -> GenerateResult:
        """Every prompt's group, in prompt order (see `stream`)."""
        return GenerateResult.merge(self.stream(prompts, spec), prompts)

    def stream(self, prompts: list[Prompt], spec: SamplingSpec | list[SamplingSpec]) -> Iterator[GenerateResult]:
        """Each prompt's group as soon as an engine finishes it, surviving the loss of actors (not of
        all of them): an actor that dies, or when no engine yields anything for `timeout_s`, is
        dropped (and replaced in the background) and its unfinished prompts are re-generated on the
        survivors. `spec`: one for all prompts, or one per prompt."""
        specs = dict(zip((p.id for p in prompts), spec if isinstance(spec, list) else [spec] * len(prompts)))
        pending = list(prompts)
        while pending:
            with self.lock:
                if not self.actors:
                    raise RuntimeError(f"every rollout actor has died ({len(self.joining) + len(self.fresh)} "
                                       "replacements are starting; they serve after the next weight sync)")
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
                        self.drop(actor, f"lost while generating ({type(err).__name__})")
                        pending.extend(left.values())
                        del streams[ref]
                        continue
                    for gone in [g.prompt.id for g in part.groups] + part.dropped:
                        left.pop(gone, None)
                    yield part

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method` on every serving actor."""
        with self.lock:
            return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def call_members(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Call `method` on every member: serving and fresh (see `members`)."""
        with self.lock:
            return [getattr(a, method).remote(*args, **kwargs) for a, _ in self.members()]

    # ---- membership

    def members(self) -> list[tuple[Any, int]]:
        """(actor, slot) of every engine the weights go to: serving, then fresh."""
        with self.lock:
            return list(zip(self.actors, self.slots)) + [(j.actor, j.slot) for j in self.fresh]

    def drop(self, actor, why: str) -> bool:
        """Take a dead or failing engine out (killed; a replacement starts); False if it was no member."""
        with self.lock:
            if actor in self.actors:
                i = self.actors.index(actor)
                slot = self.slots.pop(i)
                del self.actors[i]
            elif any(j.actor == actor for j in self.fresh):
                slot = next(j.slot for j in self.fresh if j.actor == actor)
                self.fresh = [j for j in self.fresh if j.actor != actor]
            else:
                self.retiring = [r for r in self.retiring if r[0] != actor]  # a retired one is not replaced
                ray.kill(actor, no_restart=True)
                return False
            self.lost += 1
            self.needs_resync = True
            log.error("rollout engine in slot %d dropped: %s", slot, why)
            ray.kill(actor, no_restart=True)  # frees its placement for the replacement
            self._reconcile(replacing=True)
        return True

    def resize(self, n: int) -> None:
        """Set `target` to n engines without waiting: growing starts joiners; shrinking takes the newest
        engines out of service now (they are shut down once their queued work is done)."""
        if n < 1:
            raise ValueError(f"a rollout pool needs at least one engine, got {n}")
        with self.lock:
            if n != self.target and self.colocated:
                raise ValueError("a colocated rollout pool cannot be resized: engine i shares its device "
                                 "with learner rank i")
            if n > self.target and self.launcher is None:
                raise ValueError("this rollout pool was not started by RolloutPool.start: it cannot grow")
            log.info("rollout pool: %d -> %d engines", self.target, n)
            self.target = n
            self._reconcile(replacing=False)

    def admit(self) -> int:
        """Move joiners whose engine is up to fresh (they serve after their first weight sync); restart
        the ones that died or are late; shut down retired engines that finished. Returns how many came up."""
        with self.lock:
            self._finish_retiring()
            if not self.joining:
                return 0
            refs = [j.ready for j in self.joining]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            came_up = 0
            for joiner in list(self.joining):
                if joiner.ready in done:
                    try:
                        ray.get(joiner.ready)
                    except Exception as err:  # noqa: BLE001 - any failure to start
                        self._restart(joiner, f"died while starting ({_why(err)})")
                        continue
                    self.joining.remove(joiner)
                    self.fresh.append(joiner)
                    came_up += 1
                    log.info("rollout engine in slot %d is up (attempt %d); it serves after the next weight sync",
                             joiner.slot, joiner.attempt)
                elif time.monotonic() - joiner.started > self.start_timeout_s:
                    self._restart(joiner, f"not up within {self.start_timeout_s:g} s")
            self.needs_resync |= came_up > 0
            return came_up

    def promote(self, synced: list) -> int:
        """After a weight sync that reached `synced` actors: the fresh ones among them go into service."""
        with self.lock:
            moved = [j for j in self.fresh if j.actor in synced]
            self.fresh = [j for j in self.fresh if j not in moved]
            for joiner in moved:
                self.actors.append(joiner.actor)
                self.slots.append(joiner.slot)
                self.replaced += joiner.replacement
            return len(moved)

    def shutdown(self) -> None:
        """Stop every engine (serving, fresh, joining, retiring) and its processes."""
        with self.lock:
            up = self.actors + [j.actor for j in self.fresh] + [r[0] for r in self.retiring]
            starting = [j.actor for j in self.joining]
            self.actors, self.slots, self.fresh, self.joining, self.retiring = [], [], [], [], []
            self.target = 0
        stop_actors(up)
        for actor in starting:  # still in its constructor: a shutdown call would wait for it
            ray.kill(actor, no_restart=True)
        if self.launcher is not None:
            self.launcher.release()

    # ---- internals (called with the lock held)

    def _reconcile(self, replacing: bool) -> None:
        """Start or retire engines until serving + fresh + joining == target."""
        have = len(self.actors) + len(self.fresh) + len(self.joining)
        while have > self.target:
            self._retire_newest()
            have -= 1
        if have < self.target and self.launcher is None:
            log.warning("rollout pool below target (%d of %d) and nothing to start engines with", have, self.target)
            return
        for slot in self._free_slots(self.target - have):
            self._launch(slot, replacing)

    def _launch(self, slot: int, replacement: bool, attempt: int = 1) -> None:
        actor = self.launcher.start(slot)
        self.joining.append(Joiner(actor, slot, actor.ready.remote(), replacement, attempt))
        log.info("starting a rollout engine in slot %d (%s, attempt %d)", slot,
                 "replacement" if replacement else "growth", attempt)

    def _restart(self, joiner: Joiner, why: str) -> None:
        self.joining.remove(joiner)
        self.failed_starts += 1
        ray.kill(joiner.actor, no_restart=True)
        if joiner.attempt >= MAX_START_ATTEMPTS:
            log.error("rollout engine in slot %d %s; giving up after %d attempts (pool at %d of %d)",
                      joiner.slot, why, joiner.attempt, len(self.actors) + len(self.fresh), self.target)
            return
        log.error("rollout engine in slot %d %s; starting it again", joiner.slot, why)
        self._launch(joiner.slot, joiner.replacement, joiner.attempt + 1)

    def _free_slots(self, count: int) -> list[int]:
        """`count` slots for new engines: freed slots first (lowest first), then new ones, then slots
        whose retired engine is still finishing (its actor holds the placement until it stops)."""
        busy = set(self.slots) | {j.slot for j in self.fresh + self.joining}
        retiring = {r[1] for r in self.retiring}
        free, slot = [], 0
        while len(free) < count and self.launcher.can_place(slot):
            if slot not in busy and slot not in retiring:
                free.append(slot)
            slot += 1
        free += sorted(retiring - busy)[:count - len(free)]
        if len(free) < count:
            log.warning("no placement for %d more rollout engines (pass `more` to RolloutPool.start)",
                        count - len(free))
        return free

    def _retire_newest(self) -> None:
        """Take the newest engine out: a joiner is killed, a fresh or serving one retires."""
        if self.joining:
            ray.kill(self.joining.pop().actor, no_restart=True)
            return
        if self.fresh:
            joiner = self.fresh.pop()
            actor, slot = joiner.actor, joiner.slot
        else:
            actor, slot = self.actors.pop(), self.slots.pop()
        self.retiring.append((actor, slot, actor.ready.remote()))  # done once its queued work is
        self.needs_resync = True
        log.info("rollout engine in slot %d retired; it stops once its queued work is done", slot)

    def _finish_retiring(self) -> None:
        if not self.retiring:
            return
        refs = [r[2] for r in self.retiring]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        finished = [r for r in self.retiring if r[2] in done]
        self.retiring = [r for r in self.retiring if r[2] not in done]
        stop_actors([r[0] for r in finished])


class RewardPool:
    def __init__(self, options: list[dict[str, Any]], functions: dict[str, float], timeout_s: float,
                 settings: dict[str, dict] | None = None, pass_env: tuple[str, ...] = ()):
        """One Scorer actor per entry of `options` (its placement, reused by its replacements);
        `settings`, `pass_env`: see `Scorer`."""
        self.remote = ray.remote(Scorer)
        self.functions, self.timeout_s, self.settings = dict(functions), timeout_s, settings
        self.pass_env = tuple(pass_env)
        self.options = list(options)
        self.actors = [self._start(opt) for opt in self.options]  # actor i runs on options[i]
        self.turn = 0
        self.lost = 0  # reward actors that died
        self.replaced = 0  # replacements started
        self.lock = threading.Lock()

    def _start(self, options: dict[str, Any]):
        return self.remote.options(**options).remote(dict(self.functions), self.timeout_s, self.settings, self.pass_env)

    def score(self, groups: list[Group], problems: dict[str, Problem]) -> list[list[Score]]:
        """Scores [P][G] for the groups, spreading whole groups over the reward actors."""
        requests = [score_request(g, problems[g.prompt.id]) for g in groups]
        jobs = [self.submit(chunk) for chunk in _chunks(requests, len(self.actors))]  # all running before any wait
        return [row for job in jobs for row in self.gather(job)]

    def submit(self, requests: list[ScoreRequest], attempt: int = 1) -> "ScoreJob":
        """Start scoring some groups on the next reward actor (round robin); `gather` waits."""
        with self.lock:
            actor = self.actors[self.turn % len(self.actors)]
            self.turn += 1
        return ScoreJob(actor.score.remote(requests) if requests else None, actor, requests, attempt)

    def gather(self, job: "ScoreJob") -> list[list[Score]]:
        """The job's scores [groups][G]; a dead reward actor is replaced and its job re-run on another
        (at most MAX_SCORE_ATTEMPTS tries per job)."""
        while job.ref is not None:
            try:
                return ray.get(job.ref)
            except RayActorError as err:
                self._replace(job.actor)
                if job.attempt >= MAX_SCORE_ATTEMPTS:
                    raise RuntimeError(f"{len(job.requests)} groups lost a reward actor {job.attempt} times") from err
                log.error("reward actor lost; re-scoring its %d groups on another", len(job.requests))
                job = self.submit(job.requests, job.attempt + 1)
        return []

    def _replace(self, actor) -> None:
        """Start a new reward actor on a dead one's placement (once per dead actor)."""
        with self.lock:
            if actor not in self.actors:
                return
            i = self.actors.index(actor)
            self.actors[i] = self._start(self.options[i])
            self.lost += 1
            self.replaced += 1
        log.error("reward actor %d died; a replacement is starting on its placement", i)

    def shutdown(self) -> None:
        """Stop every reward actor: each stops its reward process (`Scorer.close`), then it is killed."""
        with self.lock:
            actors, self.actors = self.actors, []
        stop_actors(actors, method="close")


@dataclass
class ScoreJob:
    ref: ray.ObjectRef | None  # resolves to [groups][G] scores
    actor: Any
    requests: list[ScoreRequest]
    attempt: int = 1


def score_request(group: Group, problem: Problem) -> ScoreRequest:
    """What the reward functions see of one group: completions, reference answer, prompt, row, and
    each trajectory's counters (none for single replies)."""
    infos = [c.info or {} for c in group.completions] if any(c.info is not None for c in group.completions) else []
    return ScoreRequest([c.text for c in group.completions], problem.answer, problem.prompt, problem.metadata, infos)
