"""skyrl-gym environments as raygrpo environments: `env.name=skyrl:<id>` (`env=skyrl_gsm8k`).

The multi-turn standard adapted here is skyrl-gym (SkyRL's environments, Gymnasium-style), chosen
over `verifiers` (prime-rl's) after reading both at 0.4.0:
- a skyrl-gym environment is one synchronous text-in, text-out object per trajectory: `init(chat)`,
  then `step(reply) -> {observations, reward, done, metadata}`. That is `envs.base.Environment`
  one for one, and our engine keeps driving generation: observations encoded as the chat
  template's delta, the policy's tokens as sampled, all trajectories in one engine batch;
- a verifiers (v1) environment owns the episode instead: its harness and agents call the model
  through a client (an OpenAI-compatible server, or its renderer calling a vLLM generate
  endpoint), asynchronously, in runtimes (subprocess, docker, modal, e2b, prime sandboxes), and
  hand back traces. Adapting it means serving the engine over HTTP and leaving token bookkeeping
  to its renderer. It also pulls 24 direct dependencies (openai, anthropic, mcp, pyzmq, uvicorn,
  prime-*); skyrl-gym pulls four (func_timeout, pandas, requests, omegaconf).

One trajectory, as SkyRL's own generator runs it (`skyrl_train/generators/skyrl_gym_generator.py`):
- a fresh environment per trajectory, `skyrl_gym.make(id, env_config=..., extras=...)`: `env_config`
  is `env.skyrl_config` (an OmegaConf node, as SkyRL passes it), `extras` the problem's row
  (`Prompt.metadata`: the columns of a SkyRL dataset besides the prompt, e.g. `reward_spec`,
  `extra_info`) with `max_turns` = `env.max_turns`, and the reference answer as
  `{"method": "rule", "ground_truth": Prompt.answer}` under `reward_spec` (and `reward_model`, which
  verl-format environments such as `aime` read) where the row has none;
- `init` gives the opening chat; each step's observations are the next turn, its reward the turn's
  (`StepResult.reward`). The trajectory's reward is their sum (the `env` reward,
  `actors.rewards.env`); the environment is closed when its trajectory ends, however it ends.
Not carried over: `postprocessed_action` (the policy's tokens stay as sampled), each step's
`metadata` and the episode's `get_metrics()` (not logged), tools (skyrl-gym environments parse
their own action tags, which the prompt describes). A reply that rollout.max_new_tokens cuts ends
its trajectory before the environment reads it (SkyRL still steps it), so it earns no env reward.
Needs the `gym` extra (`pip install -e '.[gym]'`).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

from common.errors import ConfigError
from envs.base import Message, StepResult


def _skyrl_gym():
    try:
        import skyrl_gym
    except ImportError:
        raise ConfigError("env.name=skyrl:<id> needs the skyrl-gym package: pip install -e '.[gym]'") from None
    return skyrl_gym


def check_id(env_id: str) -> None:
    """ConfigError unless skyrl-gym is installed and `env_id` is one of its registered ids, or a
    `package.module:Class` path (a skyrl_gym.Env of your own, imported where the engines run)."""
    skyrl_gym = _skyrl_gym()
    if ":" in env_id:
        module, _, cls = env_id.partition(":")
        if not (module and cls):
            raise ConfigError(f"env.name=skyrl:{env_id}: give a registered id or package.module:Class")
        return
    if env_id not in skyrl_gym.registry:
        raise ConfigError(f"env.name=skyrl:{env_id}: skyrl-gym has no environment {env_id!r} "
                          f"(registered: {', '.join(sorted(skyrl_gym.registry))}; or package.module:Class)")


def reference(problem: Any, env_id: str) -> dict[str, Any]:
    """The `extras` skyrl-gym environments are made with: the row of `problem` (the
    `actors.types.Prompt` being answered, or None), its answer as the rule-based reward's ground
    truth where the row has no `reward_spec`. ValueError when there is neither (an environment
    would otherwise judge every reply against nothing)."""
    if problem is None:
        raise ValueError(f"skyrl:{env_id} needs the problem being answered (reset(messages, problem=...))")
    extras = copy.deepcopy(dict(problem.metadata))  # each environment may keep (and change) its own
    if "reward_spec" not in extras:
        if not problem.answer:
            raise ValueError(f"skyrl:{env_id}: prompt {problem.id!r} has no reference answer and its row no "
                             "reward_spec, so the environment has nothing to judge replies against")
        extras["reward_spec"] = {"method": "rule", "ground_truth": problem.answer}
    extras.setdefault("reward_model", copy.deepcopy(extras["reward_spec"]))
    return extras


class SkyRLEnv:
    """A skyrl-gym environment, one instance per trajectory (the trajectory's state)."""

    def __init__(self, env_id: str, max_turns: int = 1, env_config: Mapping[str, Any] | None = None):
        from omegaconf import OmegaConf

        check_id(env_id)
        self.env_id, self.max_turns = env_id, max_turns
        self.env_config = OmegaConf.create(dict(env_config or {}))
        self.make: Callable[..., Any] = self._maker(_skyrl_gym(), env_id)

    @staticmethod
    def _maker(skyrl_gym: Any, env_id: str) -> Callable[..., Any]:
        if ":" not in env_id:
            return lambda **kwargs: skyrl_gym.make(env_id, **kwargs)
        from skyrl_gym.envs.registration import EnvSpec

        spec = EnvSpec(id=env_id, entry_point=env_id)  # make() checks it is a skyrl_gym.Env
        return lambda **kwargs: skyrl_gym.make(spec, **kwargs)

    def tools(self) -> None:
        return None

    def reset(self, messages: list[Message], problem: Any = None) -> tuple[list[Message], Any]:
        extras = reference(problem, self.env_id)
        extras["max_turns"] = self.max_turns  # as SkyRL's generator sets it
        env = self.make(env_config=copy.deepcopy(self.env_config), extras=extras)
        opening, _ = env.init(copy.deepcopy(messages))
        return [dict(m) for m in opening], env

    def step(self, state: Any, reply: str) -> StepResult:
        out = state.step(reply)
        done = bool(out["done"])
        messages = [] if done else [{"role": m["role"], "content": m["content"]} for m in out.get("observations") or []]
        reward = out.get("reward")
        return StepResult(messages=messages, done=done, reward=None if reward is None else float(reward))

    def close(self, state: Any) -> None:
        state.close()
