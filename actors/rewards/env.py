"""The `env` reward: the environment's own reward for a trajectory, for environments that judge
replies themselves (skyrl-gym's, `envs.skyrl`; any environment whose steps report
`StepResult.reward`).

The trajectory's reward is the sum of its per-turn rewards (`Completion.info["turn_reward"]`, summed
by `actors.multiturn`), as SkyRL does: it puts each step's reward on that turn's last token and its
GRPO sums them. It goes through the reward actors like any reward function, so weights, metrics and
failures are the same: a trajectory whose environment raised, or a completion that is no trajectory,
is `failed` (kept apart from a reward of 0); one that a limit cut before the environment judged any
reply earns 0.
"""

from __future__ import annotations


def env_reward(completion: str, answer: str, *, info: dict) -> float:
    """The sum of the environment's per-turn rewards of this completion's trajectory."""
    if not info:
        raise ValueError("not a multi-turn trajectory: the env reward needs an environment that reports "
                         "rewards (env.name=skyrl:<id>, env=skyrl_gsm8k, or your own)")
    if info.get("env_errors"):
        raise RuntimeError("the environment raised during this trajectory, which it never finished judging")
    return float(info.get("turn_reward", 0.0))
