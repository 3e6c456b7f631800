"""Multi-turn rollouts on one vLLM engine: every trajectory advances on its own.

A trajectory is a prompt's chat plus turns: the policy's reply (sampled tokens, kept as sampled),
then the environment's observation (`envs.base.Environment.step`, run in a thread pool beside the
engine), then the next reply, until the environment ends it or a limit cuts it. Each opens with
`envs.base.open_trajectory` (the problem for environments that take it) and is closed with
`envs.base.close_trajectory` however it ends. Replies of all
trajectories decode in one engine batch; a trajectory waiting for its environment holds no slot,
and its next turn is a new request whose prompt is everything so far (prefix caching reuses the
cached KV of the earlier turns). A group is yielded as soon as its G trajectories are done.

Each trajectory becomes one `Completion`: its ids are the concatenation after the prompt, `mask`
marks the policy's tokens (1) and the observations' (0), `logprobs` are the engine's for the
policy's tokens (0 elsewhere), `text` is the final reply (what rewards score), `turns` the whole
exchange and `info` its counters (turns, tool calls, errors, timeouts, cuts, `turn_reward` the sum
of the environment's per-turn rewards: what the `env` reward scores).
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from actors.types import Completion, Group, Prompt, SamplingSpec
from envs.base import Environment, Message, close_trajectory, open_trajectory
from envs.tokens import observation_ids

CUTS = ("max_turns", "max_total_tokens", "turn_length")  # why a trajectory was cut (counted in `info`)


@dataclass
class Limits:
    max_turns: int  # policy replies per trajectory
    max_total_tokens: int  # tokens after the prompt, observations included
    max_model_len: int  # the engine's context: prompt + everything after it


@dataclass
class Trajectory:
    group: int  # index of its prompt in the call
    messages: list[Message]  # the chat so far
    state: Any  # the environment's
    seed: int | None
    opening: int = 0  # messages the environment opened with (`reset`): the exchange follows them
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)
    turns: int = 0
    reply: str = ""
    finish: str = ""  # "" while running

    def count(self, key: str, n: float = 1.0) -> None:
        self.info[key] = self.info.get(key, 0.0) + n


def run(engine: Any, tokenizer: Any, env: Environment, prompts: list[tuple[Prompt, list[int], SamplingSpec]],
        version: int, params: Callable[[SamplingSpec, int, int | None], Any], limits: Limits,
        new_request_id: Callable[[], str], eot: set[int], workers: int = 16) -> Iterator[Group]:
    """Drive every trajectory of `prompts` ((prompt, prompt ids, spec): spec.n trajectories each) to
    its end; yields each prompt's Group once its trajectories are all done. `params(spec, max_tokens,
    seed)`: vLLM SamplingParams for one reply."""
    from vllm.inputs import TokensPrompt

    trajectories: list[list[Trajectory]] = []
    for g, (prompt, _, spec) in enumerate(prompts):
        group = []
        for j in range(spec.n):
            opening, state = open_trajectory(env, prompt)
            group.append(Trajectory(g, list(opening), state, None if spec.seed is None else spec.seed + j,
                                    opening=len(opening)))
        trajectories.append(group)
    running: dict[str, Trajectory] = {}
    stepping: dict[cf.Future, Trajectory] = {}
    remaining = [len(ts) for ts in trajectories]

    def submit(t: Trajectory) -> None:
        _, ids, spec = prompts[t.group]
        budget = min(spec.max_tokens, limits.max_total_tokens - len(t.ids), limits.max_model_len - len(ids) - len(t.ids))
        if budget <= 0:
            return finish(t, "max_total_tokens")
        request = new_request_id()
        seed = None if t.seed is None else t.seed + 1000 * t.turns
        engine.add_request(request, TokensPrompt(prompt_token_ids=ids + t.ids), params(spec, budget, seed))
        running[request] = t

    def finish(t: Trajectory, why: str) -> None:
        t.finish = why
        if why in CUTS:
            t.count(f"cut_{why}")
        pool.submit(close_trajectory, env, t.state)  # beside the engine, like its steps
        remaining[t.group] -= 1

    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raygrpo-env") as pool:
        for ts in trajectories:
            for t in ts:
                submit(t)
        while running or stepping:
            if running:
                for out in engine.step():
                    if out.finished and out.request_id in running:
                        t = running.pop(out.request_id)
                        if _take_reply(t, out.outputs[0]):
                            stepping[pool.submit(env.step, t.state, t.reply)] = t
                        else:
                            finish(t, "turn_length")
            done = [f for f in stepping if f.done()] if running else \
                list(cf.wait(list(stepping), return_when=cf.FIRST_COMPLETED)[0])
            for future in done:
                _observe(stepping.pop(future), future, env, tokenizer, eot, limits, submit, finish)
            for g, left in enumerate(remaining):
                if left == 0:
                    remaining[g] = -1  # yielded
                    yield _group(prompts[g], trajectories[g], version)


def _take_reply(t: Trajectory, out: Any) -> bool:
    """Append one sampled reply; True if it closed its turn (else a per-turn length limit cut it)."""
    ids = list(out.token_ids)
    t.ids += ids
    t.logprobs += [entry[tok].logprob for tok, entry in zip(ids, out.logprobs or [])]
    if len(t.logprobs) != len(t.ids):
        raise RuntimeError(f"engine returned {len(out.logprobs or [])} logprobs for {len(ids)} tokens")
    t.mask += [1] * len(ids)
    t.turns += 1
    t.count("policy_tokens", len(ids))
    t.reply = out.text
    t.messages.append({"role": "assistant", "content": out.text})
    return out.finish_reason == "stop"


def _observe(t: Trajectory, future: cf.Future, env: Environment, tokenizer: Any, eot: set[int], limits: Limits,
             submit: Callable, finish: Callable) -> None:
    """The environment answered (or raised: that ends the trajectory, counted): append its
    observation and queue the next reply, or end the trajectory."""
    try:
        result = future.result()
    except Exception:  # noqa: BLE001 - an environment's own bug must not kill the actor
        t.count("env_errors")
        return finish(t, "env_error")
    for key, n in result.info.items():
        t.count(key, n)
    if result.reward is not None:
        t.count("turn_reward", result.reward)
    if result.done:
        return finish(t, "stop")
    if t.turns >= limits.max_turns:
        return finish(t, "max_turns")
    obs = observation_ids(tokenizer, result.messages, eot, closed=t.ids[-1] in eot if t.ids else True)
    if len(t.ids) + len(obs) >= limits.max_total_tokens:
        return finish(t, "max_total_tokens")
    t.ids += obs
    t.logprobs += [0.0] * len(obs)
    t.mask += [0] * len(obs)
    t.count("env_tokens", len(obs))
    t.messages += result.messages
    submit(t)


def _group(item: tuple[Prompt, list[int], SamplingSpec], ts: list[Trajectory], version: int) -> Group:
    prompt, ids, _ = item
    completions = []
    for t in ts:
        t.info["turns"] = float(t.turns)
        reason = "stop" if t.finish == "stop" else "length" if t.finish in CUTS else "abort"
        completions.append(Completion(token_ids=t.ids, logprobs=t.logprobs, finish_reason=reason, text=t.reply,
                                      mask=t.mask, turns=t.messages[t.opening:], info=t.info))
    return Group(prompt=prompt, prompt_token_ids=ids, version=version, completions=completions)
