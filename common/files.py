"""File writes every folder may use."""

from __future__ import annotations

import os
from pathlib import Path


def write_secret(path: str | Path, text: str) -> None:
    """Write `text` to a new file that only its owner can read: created with mode 0600 (O_EXCL: never
    through a file or link someone else put there), so it is never readable with its content."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
