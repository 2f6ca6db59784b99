"""Files written so that a crash never leaves half of one, and sets of files that change as a whole.

    atomic_write(path, write)             one file: a temporary name, fsync, one rename
    replace_files(directory, writers)     several files of one directory, all or nothing
    read_stable(directory, read, marker)  read such a set as it was before or after a change, never a mix

How `replace_files` changes several files at once, with only renames (atomic on POSIX):

    1. stage    write every new file into  <dir>/.minilora-staging-<random>/, fsync each
    2. commit   rename that folder to      <dir>/.minilora-pending/            <- the change happens here
    3. apply    move each file out of pending over its old name, delete the files no longer wanted,
                remove the (now empty) pending folder

A reader that knows the protocol (`read_stable`) takes each file from pending/ while it is there, and
from the directory otherwise. Before step 2 that is the old set; from step 2 on it is the new set, even
while step 3 is half done, and even if the writer was killed there (the next `replace_files` finishes
step 3 first). A reader whose reads straddle the commit sees it: the `marker` file (a file that every
change rewrites with new content) reads differently before and after, and it reads again.

Files get the modes a plain `open()` would give them (0644 and 0755 under umask 022), not the 0600 /
0700 of temporary files: a serving account reads what a training account wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

PENDING = ".minilora-pending"
STAGING_PREFIX = ".minilora-staging-"
MANIFEST = ".manifest.json"  # inside pending: the order to move files in, and the files to delete
T = TypeVar("T")


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux's /proc); elsewhere
    set and restored at once (a short window in which another thread would create files with 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: Union[str, Path]) -> None:
    """The mode a plain open() / mkdir() gives: 0666 or 0777 less the umask."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def atomic_write(path: Union[str, Path], write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same directory, fsync, rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        give_default_mode(tmp)
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


def _fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_files(directory: Union[str, Path], writers: dict[str, Callable[[str], None]],
                  remove: tuple[str, ...] = ()) -> None:
    """Give `directory` the files `writers` write (name -> write(path)), in that order, and delete
    the names in `remove`, as one change (see the module docstring). Other files are left alone.
    One writer at a time per directory; readers need not wait."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    finish_pending(directory)  # a change a killed writer committed but did not apply
    for leftover in directory.glob(f"{STAGING_PREFIX}*"):  # a change a killed writer never committed
        shutil.rmtree(leftover, ignore_errors=True)
    for name in writers:  # temporary files of atomic_write, from before this protocol or a kill
        for leftover in directory.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=STAGING_PREFIX))
    try:
        for name, write in writers.items():
            write(str(staging / name))
            _fsync_file(staging / name)
            give_default_mode(staging / name)
        (staging / MANIFEST).write_text(json.dumps({"files": list(writers), "remove": list(remove)}))
        _fsync_file(staging / MANIFEST)
        give_default_mode(staging)
        sync_directory(staging)
        os.rename(staging, directory / PENDING)  # the commit
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sync_directory(directory)
    finish_pending(directory)


def finish_pending(directory: Union[str, Path]) -> None:
    """Apply a committed change: move each pending file over its name, delete the removed names."""
    directory = Path(directory)
    pending = directory / PENDING
    try:
        manifest = json.loads((pending / MANIFEST).read_text())
    except FileNotFoundError:
        return
    for name in manifest["files"]:
        if (pending / name).exists():
            os.replace(pending / name, directory / name)
    for name in manifest["remove"]:
        (directory / name).unlink(missing_ok=True)
    sync_directory(directory)
    (pending / MANIFEST).unlink()
    os.rmdir(pending)
    sync_directory(directory)


def locate(directory: Path, name: str) -> Path:
    """Where file `name` of `directory` is now: in a committed, not yet applied change, or in place."""
    pending = directory / PENDING / name
    return pending if pending.exists() else directory / name


def read_stable(directory: Union[str, Path], read: Callable[[Callable[[str], Path]], T], marker: str,
                attempts: int = 200) -> T:
    """`read(where)` over a directory that `replace_files` may be changing: `where(name)` gives each
    file's current path. The marker file is read before and after; if it changed (or a file moved
    away mid-read), the read is repeated, so the result is all old or all new. `read` raises
    FileNotFoundError for a missing file and ValueError for a damaged one: either is final only
    when nothing moved meanwhile (a reader such as safetensors' may open a file twice, and a
    rename between the two opens looks like damage)."""
    directory = Path(directory)
    where = lambda name: locate(directory, name)  # noqa: E731
    for attempt in range(attempts):
        before = read_optional(where(marker))
        try:
            value = read(where)
        except (FileNotFoundError, ValueError):  # missing or damaged, or moved / replaced mid-read
            moved = read_optional(where(marker)) != before or (directory / PENDING).exists()
            if not moved or attempt == attempts - 1:
                raise  # missing or damaged, not moving
        else:
            if read_optional(where(marker)) == before:
                return value
        time.sleep(min(0.001 * (attempt + 1), 0.05))
    raise RuntimeError(f"{directory} kept changing while it was read ({attempts} tries): is a writer saving "
                       "into it in a loop? Read it when the save is done")


def read_optional(path: Path) -> Optional[bytes]:
    """The file's bytes, or None if there is no such file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def read_json_object(path: Union[str, Path], what: str, fix: str, error: type = ValueError) -> dict:
    """The JSON object in `path`, or `error` saying the file is not `what` and what to do (`fix`)."""
    try:
        held = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} cannot be read as {what} ({e}); {fix}") from None
    if not isinstance(held, dict):
        raise error(f"{path} holds a {type(held).__name__}, not {what} (a JSON object); {fix}")
    return held
