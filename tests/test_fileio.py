"""The one write path of checkpoints, exports' files, index files, logs and uploads."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest

from shitu import fileio
from shitu.errors import ConfigError, DataError
from shitu.fileio import (
    check_writable,
    remove_dead_staging,
    removed_if_left_empty,
    replace_folder,
    staging_folder,
    staging_in_progress,
    staging_target,
    write_atomically,
)
from tests.fifo_helpers import returns_beside_fifo


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs procfs")
def test_an_output_folder_that_cannot_be_made_is_named_by_the_folder_that_refused_it():
    """`--out RO/new` under a folder no one may write in said 'cannot write in RO/new', a
    folder that did not exist, not the one that refused it (procfs's: root is refused too)."""
    with pytest.raises(DataError) as refused:
        check_writable(Path("/proc/self/new/lib"), "--out /proc/self/new/lib")
    assert str(refused.value).startswith(
        "--out /proc/self/new/lib: cannot make the folder in /proc/self ("
    )
    with pytest.raises(DataError, match=r"^--out /proc/self: cannot write in /proc/self \("):
        check_writable(Path("/proc/self"), "--out /proc/self")


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


def test_write_atomically_writes_where_a_link_points(tmp_path):
    """`--out best.safetensors` where that links to the file kept on another disk: the link
    was replaced by the new file, and the file it pointed to stayed stale. The file is
    staged beside the file the link points to (a rename does not cross disks)."""
    (tmp_path / "disk").mkdir()
    kept = tmp_path / "disk" / "weights.bin"
    kept.write_bytes(b"old")
    link, dangling = tmp_path / "best.bin", tmp_path / "new.bin"
    link.symlink_to(kept)
    dangling.symlink_to(tmp_path / "disk" / "made" / "new.bin")
    for path, written in ((link, kept), (dangling, tmp_path / "disk" / "made" / "new.bin")):
        assert write_atomically(path, lambda tmp: tmp.write_bytes(b"new"), durable=True) == path
        assert path.is_symlink() and written.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["best.bin", "disk", "new.bin"]
    assert sorted(os.listdir(tmp_path / "disk")) == ["made", "weights.bin"]
    loop = tmp_path / "loop.bin"
    loop.symlink_to(loop)
    with pytest.raises(OSError, match=os.strerror(errno.ELOOP)) as info:
        write_atomically(loop, lambda tmp: tmp.write_bytes(b"new"))
    assert info.value.errno == errno.ELOOP and loop.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["best.bin", "disk", "loop.bin", "new.bin"]


def test_unfinished_writes_are_looked_for_where_a_link_points(tmp_path):
    """A run's `latest.pt` linked to another disk is staged there by `write_atomically`, so
    a write killed outright leaves its temporary file there, not beside the link."""
    (tmp_path / "disk").mkdir()
    kept = tmp_path / "disk" / "checkpoint.pt"
    link = tmp_path / "latest.pt"
    link.symlink_to(kept)
    killed = tmp_path / "disk" / ".checkpoint.pt.k1ll3d_x"
    killed.write_bytes(b"half")
    assert fileio.unfinished_writes(link) == [killed]
    fileio.remove_unfinished_writes(tmp_path, ["latest.pt"])
    assert not killed.exists() and link.is_symlink()


def _folders_refuse_sync(monkeypatch, code):
    """os.fsync answering `code` for folders, as some network and FUSE filesystems do."""
    fsync = os.fsync

    def fsync_files_only(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_files_only)


def test_durable_write_goes_on_where_the_filesystem_cannot_sync_folders(tmp_path, monkeypatch):
    _folders_refuse_sync(monkeypatch, errno.EINVAL)
    target = tmp_path / "latest.pt"
    write_atomically(target, lambda tmp: tmp.write_bytes(b"whole"), durable=True)
    assert target.read_bytes() == b"whole"


def test_durable_write_reports_a_folder_sync_that_fails_for_another_reason(tmp_path, monkeypatch):
    _folders_refuse_sync(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        write_atomically(tmp_path / "latest.pt", lambda tmp: tmp.write_bytes(b"x"), durable=True)


def _folder(path, text):
    path.mkdir()
    (path / "file.txt").write_text(text)
    return path


@pytest.mark.parametrize("swap", ["exchange", "move aside"])
def test_replace_folder_swaps_in_the_new_folder_and_leaves_nothing_else(
    tmp_path, swap, monkeypatch
):
    if swap == "move aside":  # the path of platforms without an atomic swap
        monkeypatch.setattr(fileio, "_exchange", lambda first, second: False)
    elif sys.platform.startswith("linux"):
        probe_a, probe_b = _folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b")
        assert fileio._exchange(probe_a, probe_b)  # glibc and ext4/tmpfs/overlayfs swap
        assert (probe_a / "file.txt").read_text() == "b"
        for probe in (probe_a, probe_b):
            (probe / "file.txt").unlink()
            probe.rmdir()
    target = tmp_path / "model"
    replace_folder(_folder(tmp_path / ".model.new1", "first"), target)  # no folder there yet
    replace_folder(_folder(tmp_path / ".model.new2", "second"), target)
    assert (target / "file.txt").read_text() == "second"
    assert os.listdir(tmp_path) == ["model"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_replace_folder_puts_the_new_files_on_disk_before_they_take_the_name(tmp_path, monkeypatch):
    """An export's files were renamed into place unsynced: a power loss right after could
    leave empty files where the old export's whole ones were."""
    staging = _folder(tmp_path / ".model.new", "new")
    (staging / "sub").mkdir()
    (staging / "sub" / "weights.bin").write_bytes(b"w")
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            assert not (tmp_path / "model").exists()  # before the rename
            synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    monkeypatch.setattr(fileio, "_exchange", lambda first, second: False)
    replace_folder(staging, tmp_path / "model")
    assert sorted(synced) == ["file.txt", "weights.bin"]


def test_replace_folder_keeps_the_old_folder_when_the_new_one_cannot_move(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_exchange", lambda first, second: False)
    target = _folder(tmp_path / "model", "old")
    with pytest.raises(OSError):
        replace_folder(tmp_path / "missing", target)
    assert (target / "file.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["model"]


def test_replace_folder_replaces_a_link_not_the_folder_it_points_to(tmp_path):
    kept = _folder(tmp_path / "v1", "v1")
    (tmp_path / "current").symlink_to(kept)
    replace_folder(_folder(tmp_path / ".current.new", "v2"), tmp_path / "current")
    current = tmp_path / "current"
    assert not current.is_symlink() and (current / "file.txt").read_text() == "v2"
    assert (kept / "file.txt").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["current", "v1"]


@pytest.mark.parametrize(
    ("written", "named"),
    [
        ("shitu detect-train (process 12)", "another shitu detect-train (process 12) is running"),
        ("4321", "another shitu run (process 4321) is running"),  # an earlier shitu's: the pid
        ("", "another shitu run (process unknown) is running"),
    ],
)
def test_a_folder_another_run_holds_is_refused_naming_that_run(tmp_path, written, named):
    import fcntl

    folder = tmp_path / "run"
    folder.mkdir()
    lock_path = folder / fileio.RUN_LOCK
    lock_path.write_text(written)
    with open(lock_path, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError) as refused, fileio.only_run_in(folder, "--out", "x"):
            pass
    assert str(refused.value) == (
        f"--out {folder}: {named} in it; wait for it to end or stop it, or give another --out"
    )


@pytest.mark.parametrize(
    ("make", "kind"), [(os.mkfifo, "a FIFO (named pipe)"), (os.mkdir, "a folder")]
)
def test_a_lock_path_that_is_no_file_is_named_not_opened(tmp_path, make, kind):
    """A FIFO where a run's lock file goes failed with "File or stream is not seekable" (on
    systems where opening one waits for a reader, it hung), a folder with "Is a directory";
    both are named, with what to do, and left as they were."""
    folder = tmp_path / "run"
    folder.mkdir()
    make(folder / fileio.RUN_LOCK)
    with pytest.raises(DataError) as refused, fileio.only_run_in(folder, "--out", "x"):
        pass
    assert str(refused.value) == (
        f"{folder / fileio.RUN_LOCK} is {kind}, where this run keeps its lock file (a file "
        "it makes): move it away"
    )
    assert [path.name for path in folder.iterdir()] == [fileio.RUN_LOCK]


def test_a_staging_folder_names_the_folder_it_is_written_for(tmp_path):
    """A Milvus collection made by a build records the build's staging folder: the library
    that uses it is the folder that staging folder became."""
    for target in (tmp_path / "lib", tmp_path / "my.gallery v2"):
        with staging_folder(target, "building") as staging:
            assert staging_target(staging) == target
    for other in ("lib", ".lib", ".lib.building", ".lib.building-notahexuuid", "lib.building-0"):
        assert staging_target(tmp_path / other) is None


def test_a_staging_folder_is_in_progress_while_its_run_holds_its_lock(tmp_path):
    """What a build killed outright leaves (its folder, its lock no longer held) is told
    from one still running; a folder without a lock cannot be told, and counts as running."""
    with staging_folder(tmp_path / "lib", "building") as staging:
        staging.mkdir()
        assert staging_in_progress(staging)
    assert staging.exists() and not staging_in_progress(staging)
    staging.with_name(staging.name + ".lock").unlink()
    assert staging_in_progress(staging)


def test_a_fifo_named_as_a_staging_lock_is_left_and_does_not_hang_the_check(tmp_path):
    """Opening a FIFO waits for a writer: `shitu index build` beside one named as a staging
    lock (`.lib.building-<32 hex>.lock`) waited for ever. It tells nothing, and is left."""
    fifo = tmp_path / f".lib.building-{'0' * 32}.lock"
    os.mkfifo(fifo)
    assert returns_beside_fifo(fifo, lambda: remove_dead_staging(tmp_path))
    assert staging_in_progress(fifo.with_suffix(""))
    assert [path.name for path in tmp_path.iterdir()] == [fifo.name]


def test_a_check_between_a_staging_locks_making_and_locking_finds_no_dead_run(
    tmp_path, monkeypatch
):
    """Another process clearing dead staging folders (a cache load, another export) just as
    a run makes its lock: the lock must not be found unheld and removed, which left the
    run's folder with no lock, never judged dead if the run was then killed."""
    import fcntl

    target = tmp_path / "lib"
    flock = fcntl.flock

    def checked_first(handle, operation):  # the other process's check comes in between
        fileio.remove_dead_staging(tmp_path)
        return flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", checked_first)
    with staging_folder(target, "building") as staging:
        monkeypatch.setattr(fcntl, "flock", flock)
        staging.mkdir()
        assert staging.with_name(staging.name + ".lock").is_file()
        assert staging_in_progress(staging)
        fileio.remove_dead_staging(tmp_path)
        assert staging.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name, f"{staging.name}.lock"]


def test_temporary_names_of_a_long_name_fit_and_are_found_again_when_left(tmp_path):
    """The temporary names beside a file or folder of a 255-byte name are cut to fit the
    file system's limit; what a run killed outright leaves under them (a staging folder
    and its lock, a file's temporary copy) is still found, and removed, by the next run to
    that name (with the dead ones of names cut to the same, which are as dead)."""
    target = tmp_path / ("é" + "t" * 253)  # 255 bytes, the first character two of them
    other = tmp_path / ("é" + "t" * 252 + "u")  # the same name but for its last letter
    for name in (target, other):
        with staging_folder(name, "exporting") as staging:
            staging.mkdir()  # left, as by a run killed outright: its lock no longer held
    assert all(len(os.fsencode(path.name)) <= 255 for path in tmp_path.iterdir())
    with staging_folder(target, "exporting") as staging:
        leftovers = sorted(path.name for path in tmp_path.iterdir())
    assert leftovers == [staging.name + ".lock"]  # the live one's lock alone: both dead removed
    fileio.write_atomically(target, lambda tmp: tmp.write_bytes(b"whole"))
    killed = tmp_path / f"{fileio.temporary_prefix(target.name)}k1ll3d_x"
    killed.write_bytes(b"half")
    assert len(os.fsencode(killed.name)) == 255
    assert fileio.unfinished_writes(target) == [killed]
    fileio.remove_unfinished_writes(tmp_path, [target.name])
    assert [path.name for path in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes() == b"whole"


def test_folders_made_above_one_never_made_are_removed_when_left_empty(tmp_path):
    """A block that made new/sub but failed before new/sub/out leaves neither: the missing
    deepest folder ended the clean-up, which left the folders above it behind."""
    with pytest.raises(RuntimeError), removed_if_left_empty(tmp_path / "new" / "sub" / "out"):
        (tmp_path / "new" / "sub").mkdir(parents=True)
        raise RuntimeError("failed before making out")
    assert list(tmp_path.iterdir()) == []
    # one written in stays, and so do the folders above it
    with removed_if_left_empty(tmp_path / "kept" / "out"):
        (tmp_path / "kept" / "out").mkdir(parents=True)
        (tmp_path / "kept" / "out" / "file").write_text("x")
    assert (tmp_path / "kept" / "out" / "file").is_file()
