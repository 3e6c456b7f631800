"""Named choices as small lazy registries: name -> function, imported on first lookup.

Config validation checks names against a registry's keys without importing what the functions
need (torch, math-verify, sympy), so the config imports fast and a typo fails with the known names.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable, Iterator


class LazyRegistry(Mapping):
    """name -> function, each given as `module:attribute` and imported on first lookup."""

    def __init__(self, paths: dict[str, str]):
        self.paths, self.loaded = dict(paths), {}

    def __getitem__(self, name: str) -> Callable:
        if name not in self.loaded:
            module, _, attr = self.paths[name].partition(":")  # KeyError for an unknown name
            self.loaded[name] = getattr(importlib.import_module(module), attr)
        return self.loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def one_of(names) -> str:
    """Names as prose for a message: "a", "a or b", "a, b or c"."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
