"""Files written so that a crash never leaves half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same directory, fsync, rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    sync_directory(path.parent)  # make the rename itself durable


def sync_directory(directory) -> None:
    """fsync a directory, so that renames inside it survive a crash (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
