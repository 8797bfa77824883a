"""File helpers shared by every writer: checksums and write-to-temp-then-rename.

Checkpoints, exports, index files, embeddings, logs and uploads all go through
`write_atomically`, so a crash or a full disk never leaves a half-written file under
the name a reader opens.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_atomically(path: Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path`.

    Readers see the old file or the whole new one; a failed write leaves no temporary file.
    `durable` also syncs the file and the folder, so the new file survives a power loss.
    The file gets the permissions a plain `open` would give it (the temporary file's are
    owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path
