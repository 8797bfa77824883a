"""The one write path of checkpoints, exports' files, index files, logs and uploads."""

from __future__ import annotations

import os
import stat

import pytest

from shitu.fileio import write_atomically


def test_write_atomically_replaces_the_file_whole_with_plain_permissions(tmp_path):
    target = tmp_path / "sub" / "weights.bin"
    assert write_atomically(target, lambda tmp: tmp.write_bytes(b"new"), durable=True) == target
    assert target.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not the temp file's 0o600
    assert os.listdir(target.parent) == ["weights.bin"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "labels.txt"
    target.write_text("old")

    def fail_halfway(tmp):
        tmp.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, fail_halfway)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["labels.txt"]
