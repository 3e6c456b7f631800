"""Errors every folder may raise."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the configuration; the message is shown as is, without a traceback."""


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)
