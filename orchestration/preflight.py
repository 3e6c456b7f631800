"""Checks of what a run will touch, before Ray or any actor starts (placeholder: filled in next)."""

from __future__ import annotations

from typing import Any


def check_overrides(argv: list[str], conf_dir: str) -> None:
    """Raise ConfigError for a command-line override that selects an unknown preset."""


def check_run(cfg: Any) -> None:
    """Raise ConfigError for an output_dir that cannot be written or a Ray address that cannot be reached."""
