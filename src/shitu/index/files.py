"""File helpers for crash safety: checksums and write-to-temp-then-rename."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

CRASH_ENV = "SHITU_INDEX_CRASH_AT"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX needs the directory synced too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then fsync and rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    crash_point("index-file-written")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named point of a write when the env var names it.

    The crash-safety tests run a writer in a subprocess with SHITU_INDEX_CRASH_AT=<name> and
    then check that the library still opens, verifies and holds its previous content.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
