"""Environments for multi-turn rollouts (see `envs.base`): built-ins by name, custom ones by import path."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from envs.base import Environment, SingleTurn, StepResult, close_trajectory, open_trajectory

__all__ = ["EnvSpec", "Environment", "SingleTurn", "StepResult", "close_trajectory", "make_env", "open_trajectory"]


@dataclass(frozen=True)
class EnvSpec:
    """What every engine builds its environment from (the `env.*` config, see its fields there)."""

    name: str = "single"
    tools: tuple[str, ...] = ()
    max_turns: int = 1
    tool_timeout_s: float = 5.0
    max_total_tokens: int = 0  # 0: rollout.max_new_tokens × max_turns
    skyrl_config: dict[str, Any] = field(default_factory=dict, hash=False)  # a skyrl-gym env's `env_config`

    @property
    def multi_turn(self) -> bool:
        return self.name != "single"


def make_env(spec: EnvSpec) -> Environment:
    """"single" (one reply), "tools" (`envs.tools.ToolEnv` with `spec.tools`, see `envs.tools.resolve_tool`),
    "skyrl:<id>" (a skyrl-gym environment, `envs.skyrl.SkyRLEnv`), or "package.module:Class", built
    as Class(max_turns=..., tool_timeout_s=...)."""
    if spec.name == "single":
        return SingleTurn()
    if spec.name.startswith("skyrl:"):
        from envs.skyrl import SkyRLEnv

        return SkyRLEnv(spec.name.removeprefix("skyrl:"), max_turns=spec.max_turns, env_config=spec.skyrl_config)
    if spec.name == "tools":
        from envs.tools import ToolEnv, resolve_tool

        return ToolEnv([resolve_tool(t) for t in spec.tools], max_turns=spec.max_turns,
                       timeout_s=spec.tool_timeout_s)
    module, _, cls = spec.name.partition(":")
    return getattr(importlib.import_module(module), cls)(max_turns=spec.max_turns, tool_timeout_s=spec.tool_timeout_s)
