"""File writes every folder may use: a secret, a file or a directory all at once (stdlib only).

`write_atomic` and `write_dir_atomic` write beside the target and rename into place, so a reader,
or a process killed mid-write, sees the old content or the whole new one, never part of it. They
sync to disk only when asked (`fsync=True`: a checkpoint must survive a power loss; a cache that
is rebuilt when missing need not pay for it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_secret(path: str | Path, text: str) -> None:
    """Write `text` to a new file that only its owner can read: created with mode 0600 (O_EXCL: never
    through a file or link someone else put there), so it is never readable with its content."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_atomic(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Replace the file `path` with `text` (UTF-8) by way of a uniquely named sibling, so writers
    racing for the same file each rename a whole one. The file gets the mode `open()` would give
    it (the umask's); its directory is made when missing. fsync: the text and the rename are on
    disk when this returns. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            _write(f, text, fsync)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        sync_dir(path.parent)
    return path


def write_dir_atomic(path: str | Path, fill: Callable[[Path], None], *, staging: str | Path | None = None,
                     replace: bool = True, fsync: bool = False) -> bool:
    """Make the directory `path` all at once: `fill(tmp)` writes its content into a sibling that is
    renamed to `path` only when `fill` returns; if anything fails, the sibling is removed and the
    error raised. Returns whether this call's directory is now at `path`.

    staging: the sibling's path, for a caller that finds and clears what a killed write left (it is
    cleared first); default a new uniquely named one (mode 0700, as `mkdtemp` makes it), so that
    processes building the same directory never share one. replace: an existing `path` is removed
    first; False: it stays, and the directory that was renamed into place first wins (this call's
    copy is dropped and False returned). fsync: the rename is on disk when this returns (the parent
    synced); the files `fill` wrote are the caller's to sync (`write_synced`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    else:
        tmp = Path(staging)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        fill(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace:
                raise
            return False  # another process renamed its copy into place first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing there after a rename
    if fsync:
        sync_dir(path.parent)
    return True


def write_synced(path: str | Path, text: str) -> None:
    """Write `text` to `path` (in place, not atomic: for files inside a directory that is renamed
    into place as a whole) and sync it to disk."""
    with open(path, "w") as f:
        _write(f, text, fsync=True)


def sync_dir(path: str | Path) -> None:
    """Sync a directory, so the names created in it or renamed into it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(f, text: str, fsync: bool) -> None:
    f.write(text)
    if fsync:
        f.flush()
        os.fsync(f.fileno())
