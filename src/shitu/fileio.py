"""File helpers: reading the text files people write; for every writer, checksums,
write-to-temp-then-rename and folder swaps; the locks that keep two runs from writing one
folder or output at once.

Checkpoints, exports, index files, embeddings, logs and uploads all go through
`write_atomically`, so a crash or a full disk never leaves a half-written file under
the name a reader opens.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import glob
import hashlib
import io
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shitu.errors import CheckpointError, ConfigError, DataError, ShituError

if TYPE_CHECKING:
    from PIL import Image

# Held by the training run (`shitu train`, `shitu detect-train`) writing in a folder; it
# holds what that run is, as `only_run_in` tells another one.
RUN_LOCK = ".shitu-train.lock"

# The advice for a text file in neither encoding (a list a Windows tool wrote in cp1252, say).
SAVE_AS_UTF8 = "save it as UTF-8"


# What a path that is no regular file is, by its stat mode's test.
_NOT_REGULAR = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(info: os.stat_result) -> str:
    """What a path of this `os.stat` is that is neither a regular file nor a folder ("a
    character device"), for messages: such a path exists, so it is no "not found"."""
    return next((kind for test, kind in _NOT_REGULAR if test(info.st_mode)), "a special file")


def read_regular_file(
    path: str | os.PathLike, what: str, limit: int | None = None, remedy: str = ""
) -> bytes:
    """The bytes of the file at `path`, read only where it is a regular file (of at most
    `limit` bytes, if given): a device (`/dev/zero`) was read until memory ran out, and
    opening a FIFO waited for a writer without end. Raises OSError, whose strerror says
    why not: "a character device, not `what`" ("an image file"), or the size over `limit`
    with the `remedy` that raises it, if given (IsADirectoryError for a folder)."""
    with open_regular_file(path, what, limit, remedy) as handle:
        return handle.read()


@contextlib.contextmanager
def open_regular_file(
    path: str | os.PathLike, what: str, limit: int | None = None, remedy: str = ""
) -> Iterator[io.BufferedReader]:
    """The file at `path` open for reading, where it is a regular file (see
    `read_regular_file`, which raises the same OSErrors)."""
    # Non-blocking: a FIFO opens at once, to be refused below; no effect on regular files.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{special_kind(info)}, not {what}", os.fspath(path))
        if limit is not None and info.st_size > limit:
            raise OSError(
                errno.EFBIG,
                f"{info.st_size / 2**30:.1f} GiB, over the {limit / 2**30:g} GiB {what} may "
                f"hold{f' ({remedy})' if remedy else ''}; not read",
                os.fspath(path),
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            yield handle
    finally:
        os.close(fd)


def read_text(path: str | Path) -> str:
    """A text file as the usual editors and shells write it: UTF-8 with or without a BOM
    (Notepad, Excel), or UTF-16 with its BOM (PowerShell 5's `>` and `Out-File`, Notepad's
    "Unicode"). Anything else raises UnicodeDecodeError: guessing a legacy code page would
    turn accented labels into other letters without a word. So does text with a NUL byte,
    which no editor writes: UTF-16 without its BOM is valid UTF-8 with a NUL beside each
    ASCII character, and was read as lines of NULs. What is no regular file (a device)
    raises OSError (`read_regular_file`)."""
    data = read_regular_file(path, "a text file")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    text = data.decode("utf-8-sig")
    if "\0" in text:
        at = data.index(b"\0")
        raise UnicodeDecodeError("utf-8", data, at, at + 1, "a NUL byte (UTF-16 without its BOM?)")
    return text


def text_lines(text: str) -> list[str]:
    """`text`'s lines, ended as files end them: at \\n, \\r\\n or \\r alone. Not at the other
    characters `str.splitlines()` also ends lines at (\\v, \\f, \\x1c-\\x1e, \\x85, U+2028,
    U+2029), which a file name may hold, and a label by mistake: such a line was read as
    two, each refused for a missing tab, under line numbers the file does not have. A
    byte-order mark starting a line is left out: the BOM of a file joined onto another
    (`cat a.txt b.txt`, each saved by Notepad), invisible, was read as part of the path."""
    lines = [line.removeprefix("\ufeff") for line in re.split(r"\r\n|\r|\n", text)]
    return lines[:-1] if lines[-1] == "" else lines


def refuse_non_utf8_path(path: Path, what: str, readers: str, error: type[ShituError]) -> None:
    """Raise `error` naming `path` where it is not UTF-8 text (a name in a legacy code page,
    which Python gives as lone surrogates): `readers` (onnxruntime, torch's ONNX exporter,
    Faiss) take file paths only as UTF-8 and failed inside, with a TypeError or a traceback.
    `what` says whose path it is ("the library's path"); check the path as it is handed to
    them (resolved where they resolve it)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise error(
            f"{path}: {what} is not UTF-8 text, and file paths reach {readers} only as UTF-8: "
            "give it a path in UTF-8 (rename the folder or file named in another encoding)"
        ) from None


def file_sha256(path: Path, what: str = "a regular file") -> str:
    """The SHA-256 of the file at `path`, `what` ("an image file"), read only where it is a
    regular file (`open_regular_file`): a FIFO listed as a gallery image waited for a writer
    without end, /dev/zero was read for ever."""
    digest = hashlib.sha256()
    with open_regular_file(path, what) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What filesystems that cannot sync a folder (some network and FUSE ones) answer.
_FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def drop_unwritten_stdout() -> None:
    """Where stdout's reader is gone (`| head`), what is left in its buffer cannot be
    written, and Python's flush at exit would print "Exception ignored ... OSError" after
    the program's own words: it goes to devnull instead."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX needs the directory synced too).

    Where the filesystem cannot sync a folder, the rename is left as durable as it makes
    it: the file is whole either way, and refusing it would fail every save there.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FOLDER_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def occupied(path: Path) -> bool:
    """Whether a new folder cannot be put at `path`: something is there other than an empty
    folder (which one made beforehand, `mkdir out`, is taken as the place to fill)."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def folder_place(path: str | Path) -> Path:
    """Where a folder written whole at `path` (a library, an export), or a file written by
    `write_atomically`, is made: a symbolic link there (to a folder on another disk, say) is
    followed, as the folder or file is renamed into place, and a rename puts it in the
    link's place (leaving what the link points to stale) or, across disks, fails."""
    path = Path(path)
    try:
        return path.resolve() if path.is_symlink() else path
    except RuntimeError:  # a link to itself, in a loop: Python 3.13 raises this OSError
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and write a file in it, before long work whose results go
    there: an unusable place (a file in the way, no permission, a read-only or virtual file
    system) is a one-line error naming `what` now, not a traceback after the work. A
    symbolic link `folder` to a folder not made yet (on another disk, say) has it made
    where it points (`folder_place`): mkdir of the link itself failed with "File exists"."""
    refuse_file_in_the_way(folder, what)
    try:
        folder_place(folder).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".shitu-write-check.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or exc
        if not os.path.lexists(folder):  # named by the folder it was to be made in, which refused
            place = next((up for up in folder.parents if up.is_dir()), folder.parent)
            raise DataError(f"{what}: cannot make the folder in {place} ({reason})") from None
        raise DataError(f"{what}: cannot write in {folder} ({reason})") from None


@contextlib.contextmanager
def removed_if_left_empty(folder: Path | None) -> Iterator[None]:
    """Remove `folder`, and the folders above it made with it, where the block leaves them
    empty: an output folder made early, to check that it can be written in, is no trace
    of a command that then failed (a wrong library, no readable image) before writing in
    it. None: no folder."""
    made = [] if folder is None else [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        yield
    finally:
        for empty in made:  # the deepest first
            try:
                empty.rmdir()
            except FileNotFoundError:  # never made (the block failed first): those above were
                continue
            except OSError:  # not empty: written in, by this run or another
                break


def refuse_file_in_the_way(folder: Path, what: str) -> None:
    """A DataError naming `what` where `folder`, or a folder on its path, is a file (or a
    device, a FIFO: said so); for a check that makes no folder (`check_writable` makes it)."""
    existing = next((f for f in (folder, *folder.parents) if f.exists()), None)
    if existing is not None and not existing.is_dir():
        kind = "a file" if existing.is_file() else special_kind(existing.stat())
        raise DataError(f"{what}: {existing} is {kind}, not a folder")


@contextlib.contextmanager
def held_lock(path: Path, holder: str, refused: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an flock on the file `path` (made if missing; the kernel releases it when the
    process dies) while the block runs, with `holder` (what this run is) written in it. Held
    by another run: raises `refused(what that run wrote)`. A block may remove the file before
    it ends; a run that locked it just as it went locks the file made in its place."""
    import fcntl  # POSIX, as the staging locks

    while True:
        lock = _open_lock_file(path)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            other = lock.read().strip()
            lock.close()
            raise refused(other) from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                break
        lock.close()  # removed by the run that held it
    with lock:
        lock.truncate(0)
        lock.write(holder)
        lock.flush()
        yield


def _open_lock_file(path: Path) -> io.TextIOWrapper:
    """The file `path` opened to be locked and written ("a+"), made if missing. Anything
    else in its place is a DataError naming it: a folder gave "Is a directory", and a FIFO
    "File or stream is not seekable" (or, where opening one waits for a reader, a run that
    never started)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except IsADirectoryError:
        kind = "a folder"
    else:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            return open(fd, "a+")  # the caller closes it
        os.close(fd)
        kind = special_kind(info)
    raise DataError(
        f"{path} is {kind}, where this run keeps its lock file (a file it makes): move it away"
    )


@contextlib.contextmanager
def only_run_in(folder: Path, setting: str, command: str) -> Iterator[None]:
    """Make `folder` (see `check_writable`) and hold its run lock (`held_lock`) while the
    block runs: a second training run into the folder, say a resume started while the run
    it resumes still goes on, is refused naming the running one (`command`, `shitu train`,
    and its process), where both would write the same checkpoint. `setting`: the option or
    config key that named the folder. Folders made here and left with nothing but the lock
    (a run that failed to start) are removed."""
    what = f"{setting} {folder}"

    def refused(holder: str) -> ConfigError:
        if not holder or holder.isdigit():  # written by an earlier shitu: its pid alone
            holder = f"shitu run (process {holder or 'unknown'})"
        return ConfigError(
            f"{what}: another {holder} is running in it; wait for it to end or stop it, or "
            f"give another {setting}"
        )

    with removed_if_left_empty(folder):
        made = not folder.exists()
        check_writable(folder, what)  # one line, not an OSError
        lock_path = folder / RUN_LOCK
        with held_lock(lock_path, f"{command} (process {os.getpid()})", refused):
            try:
                yield
            finally:
                if made and [entry.name for entry in folder.iterdir()] == [RUN_LOCK]:
                    lock_path.unlink()


def torch_save_atomically(payload: Any, path: Path, durable: bool = False) -> Path:
    """`torch.save(payload)` to `path` by `write_atomically` (`durable` as there); a refused
    write (a full disk, no permission) is a CheckpointError naming `path` and the system's
    reason, and the file `path` held stays."""
    import torch  # here: the command line imports this module without loading torch

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:  # a refused write's OSError then stays behind torch's
            torch.save(payload, handle)

    try:
        return write_atomically(path, write, durable)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot write {path}: {write_failure_reason(exc)}") from None


def write_jpeg(path: Path, image: Image.Image, quality: int) -> Path:
    """Save `image` as JPEG at `path` by `write_atomically`; a refused write (a full disk,
    the file size limit) is a DataError naming `path`. Encoded in memory and written by
    Python, not by Pillow's encoder, which takes a short write for a whole one: the photo
    was cut short without a word. And whole or not at all, if the run is stopped mid-write."""
    encoded = io.BytesIO()
    image.convert("RGB").save(encoded, "JPEG", quality=quality)
    try:
        return write_atomically(path, lambda tmp: tmp.write_bytes(encoded.getvalue()))
    except OSError as exc:  # said of the temporary file, or of no file at all
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_failure_reason(exc: BaseException) -> str:
    """Why a write failed, in the system's words ("No space left on device"). torch.save
    into a file object reports a refused write as its own RuntimeError ("unexpected pos
    ..."), with the system's OSError only as its context."""
    refusal = exc if isinstance(exc, OSError) else exc.__context__
    if isinstance(refusal, OSError) and refusal.strerror:
        return refusal.strerror
    return str(exc)


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()
# What a plain `open` or `mkdir` would give (temporary files and folders are owner-only).
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK


# The longest name, in bytes, of a file or folder on the usual file systems (ext4, XFS,
# btrfs, APFS, NTFS in UTF-8 terms near enough).
NAME_MAX = 255


def name_within(name: str, affixes: int) -> str:
    """`name` as it goes into a temporary name beside the file or folder it names, which
    adds `affixes` bytes (dots, a suffix, a random part): cut, at a character, so that the
    whole fits NAME_MAX. A name the file system takes (up to 255 bytes) failed as "File
    name too long" once the temporary name's 10 to 53 bytes were added."""
    encoded = os.fsencode(name)
    room = max(NAME_MAX - affixes, 1)
    if len(encoded) <= room:
        return name
    while room > 1 and encoded[room] & 0xC0 == 0x80:  # not inside a UTF-8 character
        room -= 1
    return os.fsdecode(encoded[:room])


def temporary_prefix(name: str) -> str:
    """The prefix of the temporary file `write_atomically` writes `name` as: `.NAME.`,
    which mkstemp follows with 8 characters (NAME cut to fit, `name_within`)."""
    return f".{name_within(name, 10)}."


def write_atomically(path: Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it to `path`.

    Readers see the old file or the whole new one; a failed write leaves no temporary file.
    `durable` also syncs the file and the folder, so the new file survives a power loss.
    The file gets the permissions a plain `open` would give it (the temporary file's are
    owner-only). A symbolic link at `path` is followed (`folder_place`): the file is
    written, and staged, where it points; a link in a loop is an OSError (ELOOP).
    """
    path = Path(path)
    place = folder_place(path)
    place.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temporary_prefix(place.name), dir=place.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, place)
        if durable:
            fsync_dir(place.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def unfinished_writes(path: Path) -> list[Path]:
    """The temporary files `write_atomically` left beside `path` where it was killed outright
    (SIGKILL, a power loss) while writing it: nothing else removes them, and that of a
    training checkpoint is as large as the checkpoint. Names as mkstemp makes them: the
    prefix, then 8 characters of its alphabet. A link at `path` is followed, as
    `write_atomically` stages the file where the link points."""
    place = folder_place(path)
    prefix = temporary_prefix(place.name)
    own = re.compile(rf"{re.escape(prefix)}[a-z0-9_]{{8}}")
    candidates = place.parent.glob(f"{glob.escape(prefix)}*")
    return sorted(candidate for candidate in candidates if own.fullmatch(candidate.name))


def remove_unfinished_writes(folder: Path, names: Iterable[str]) -> None:
    """Remove the `unfinished_writes` of each of the files `names` in `folder`: for a run
    that holds the folder (`only_run_in`), where no other process writes them."""
    for name in names:
        for leftover in unfinished_writes(folder / name):
            leftover.unlink(missing_ok=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the
    platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl < 1.2.4)
        return False
    status = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


@contextlib.contextmanager
def staging_folder(target: Path, doing: str) -> Iterator[Path]:
    """A fresh name `.TARGET.DOING-<random>` beside `target`, for a folder that is written
    whole and then renamed to `target` (the caller makes it, and removes it on failure);
    TARGET is cut where the name would be too long (`name_within`).

    A lock file beside it is held while the block runs (an flock, which the kernel releases
    when the process dies, also across hosts on NFSv4), so that staging folders of earlier
    runs to `target` that were killed outright (SIGKILL, power loss), and would otherwise
    stay on disk, are told from live ones and removed first. Where the folder outlives the
    block (interrupted again while cleaning up), the unheld lock stays for the next run to
    find it dead. A folder without a lock is not ours to judge.
    """
    import fcntl  # POSIX: the commands that stage folders run on Linux and macOS

    # `.NAME.DOING-<32 hex>.lock-new`, the longest name made here, within NAME_MAX.
    name = name_within(target.name, len(doing) + 44)
    remove_dead_staging(target.parent, glob.escape(name), doing)
    # A name no other run can have, on this host or another sharing the folder.
    staging = target.parent / f".{name}.{doing}-{uuid.uuid4().hex}"
    lock_path = staging.with_name(staging.name + ".lock")
    # Locked under a name no check looks for, then renamed: a check never finds the lock
    # unheld between its making and its locking (and takes a live run's folder for dead).
    unannounced = lock_path.with_name(lock_path.name + "-new")
    with open(unannounced, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: never contended
        os.replace(unannounced, lock_path)
        try:
            yield staging
        finally:
            if not staging.exists():
                lock_path.unlink(missing_ok=True)


def remove_dead_staging(parent: Path, target: str = "*", doing: str = "*") -> None:
    """Remove the staging folders in `parent` (named by `staging_folder`; `target` and
    `doing` as glob patterns) whose runs were killed outright (SIGKILL, power loss): their
    lock is not held. Live ones, and leftovers that cannot be judged or removed here
    (another user's), stay."""
    for lock_path in parent.glob(f".{target}.{doing}-*.lock"):
        staging = lock_path.with_suffix("")
        try:
            if staging_in_progress(staging):
                continue
            shutil.rmtree(staging, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        except OSError:
            continue


def path_exists(path: Path) -> bool:
    """`path.exists()`, but a name too long for a file (ENAMETOOLONG, which pathlib raises)
    names none: a list's line naming one is a missing file, not a traceback."""
    try:
        return path.exists()
    except OSError:
        return False


def listed_file(folder: Path, name: str) -> Path:
    """The file that a list in `folder` (a label file, a COCO or VOC annotation list) names
    as `name`, relative to it or absolute: on a system whose separator is '/', a name with
    backslashes that names no file is read with '/' in their place where that names one, as
    a list made on Windows has them (a backslash may be part of a file name there, so the
    name as written comes first)."""
    path = folder / name
    if "\\" in name and os.sep == "/" and not path_exists(path):
        posix = folder / name.replace("\\", "/")
        if path_exists(posix):
            return posix
    return path


def staging_target(staging: Path) -> Path | None:
    """The folder that `staging`, named by `staging_folder`, is written for (whether or not
    it has taken that name yet); None for a path of any other name."""
    match = re.fullmatch(r"\.(.+)\.[a-z]+-[0-9a-f]{32}", staging.name)
    return staging.with_name(match[1]) if match else None


def staging_in_progress(staging: Path) -> bool:
    """Whether the run that writes `staging`, a folder named by `staging_folder`, still
    goes on: it holds the lock beside it. One whose lock is not held was killed outright
    (its folder left for the next run to that target to remove); True where there is no
    lock to tell by, or no file under its name (a FIFO there: opening it waited for a
    writer, and `shitu index build` with it, for ever)."""
    import fcntl

    try:
        with open_regular_file(staging.with_name(staging.name + ".lock"), "a lock file") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held, or nothing to tell by
        return True
    return False


def replace_folder(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` in the place of `target` (which may not exist).

    Readers see the old folder or the new one, never none: on Linux the two are swapped in
    one step; elsewhere, and where `target` is a link (replaced, not followed), the old one
    is moved aside just before the new one takes its name. The old folder is deleted
    afterwards, and `staging` is gone either way. The new folder's files are on disk before
    it takes the name, so that a power loss cannot leave empty or partial files in place of
    the old folder's whole ones.
    """
    staging, target = Path(staging), Path(target)
    _sync_tree(staging)
    if not target.exists() and not target.is_symlink():
        os.replace(staging, target)
    elif not target.is_symlink() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder; it is out of sight
    else:  # also a link to a folder, which is replaced by the folder, not followed
        prefix = f".{name_within(target.name, 14)}.old."  # and 8 characters of mkdtemp's
        old = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        os.replace(target, old / target.name)
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(old / target.name, target)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def _sync_tree(folder: Path) -> None:
    """Flush every file under `folder`, and the folders, to disk: a rename is durable only
    for what is on disk already."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(root))


# How a URL starts (`https://`, `s3://`): PaddleClas downloads what one names, shitu reads
# local files only.
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str | os.PathLike) -> bool:
    """Whether a path as given is a URL: pathlib reads `https://host/a.jpg` as the missing
    file `https:/host/a.jpg`, and said no more."""
    return bool(_URL_START.match(os.fspath(value)))


def refuse_url(given: str | os.PathLike, what: str, error: type[ShituError] = DataError) -> None:
    """An `error` where the path `given` for `what` ("images") is a URL, saying to
    download it: shitu fetches nothing."""
    if is_url(given):
        raise error(
            f"{os.fspath(given)} is a URL, and shitu downloads no {what}: download the file "
            f"(e.g. `curl -LO {os.fspath(given)}`) and give its path"
        )


def is_given_path(value: object) -> bool:
    """Whether `value` is a path to hand pathlib: text or os.PathLike, not empty. Anything
    else (None, an unset setting) would fail inside pathlib saying only its type, and ''
    be taken for the current folder."""
    return isinstance(value, str | os.PathLike) and bool(os.fspath(value))


def home_expanded(value: Any) -> Any:
    """`value` with the `~` that starts it (`~/runs`, `~user/runs`) expanded to that home
    folder, if it is text: for paths no shell expanded (after `KEY=` or `--option=`, in a
    config file), where a literal `~` folder made in the working directory is one `rm -r ~`
    away from disaster."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    return value


def expanded_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, its leading `~` expanded (`home_expanded`): a library or export
    given as "~/lib" from Python was made in a literal `~` folder in the working directory,
    and a model or library there was not found, where `Recognizer.open`, whose config
    expands it, found them."""
    return Path(home_expanded(os.fspath(path)))


def from_working_directory(path: str | Path) -> str:
    """Where a relative config path was looked for, to add to a "not found": from the
    working directory, not the config's folder (the shipped configs' `../shared/...` fit
    the repository's root only); '' for an absolute path."""
    if Path(path).is_absolute():
        return ""
    return f" (relative paths are taken from the working directory, {Path.cwd()})"


def read_listing_text(path: str, named: str) -> str:
    """The text of the listing file at `path` (`read_text`); a DataError, `named` ("class
    file x"), for one that is not there, a folder or no regular file (a device, a FIFO),
    each said to be what it is: all were "not found". UnicodeDecodeError is left to the
    caller, whose advice differs by file."""
    try:
        return read_text(path)
    except FileNotFoundError:
        raise DataError(f"{named} not found{from_working_directory(path)}") from None
    except IsADirectoryError:
        raise DataError(f"{named} is a folder, not a text file") from None
    except OSError as exc:  # "a character device, not a text file", "Permission denied"
        raise DataError(f"{named}: cannot read it ({exc.strerror or exc})") from None
