"""Common machinery of the image datasets: checks at start-up, loading, clear errors.

A dataset is a list of (image path, label, unique id). Items are
`(image: float32 tensor [3, H, W], label: int, unique_id: int)`. Paths, labels
and ids are kept in flat numpy buffers rather than Python lists, so DataLoader
workers (forked processes) share them instead of copying them page by page as
reference counts change.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn, overload
from unicodedata import normalize

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from torch.utils.data import Dataset

from shitu.data.transforms.compose import Compose, build_transforms
from shitu.data.transforms.ops import (
    UnreadableImageError,
    check_image_size,
    unidentified_reason,
)
from shitu.errors import DataError, first_few
from shitu.fileio import (
    from_working_directory,
    read_listing_text,
    special_kind,
    text_lines,
)
from shitu.image_files import (
    header_error,
    is_header,
    read_image_file,
    undecodable_text_reason,
    unreadable_reason,
)
from shitu.progress import ImageProgress

TransformOps = list[dict[str, dict[str, Any] | None]]
# (index, why) of each listed path a dataset cannot use.
Problems = tuple[tuple[int, str], ...]

# How many missing or bad files an error message lists before summarising.
_SHOW = 5
# How many images listed more than once a warning names.
_SHOW_REPEATED = 3
# How many start-up scans `reused_scans` keeps (a run's train, query and gallery sets fit).
_SCANS_KEPT = 8
# EXIF orientations that turn the image a quarter (DecodeImage applies them).
_QUARTER_TURNS = (5, 6, 7, 8)
# Why a listed path is not used, when there is no file at it.
_NOT_FOUND = "file not found"


@dataclass(frozen=True)
class Scan:
    """A start-up scan of the listed paths: the ones that cannot be used, and with
    skip_corrupt the upright (width, height) of each decoded image (by index; rows of the
    others unused), for each dataset to check against its own transforms."""

    problems: Problems
    sizes: np.ndarray | None


# Within `reused_scans`: (skip_corrupt, working directory, digest of the listed paths) ->
# the scan, least recently used first. None outside it.
_scans: OrderedDict[tuple[bool, str, bytes], Scan] | None = None
# Within `scan_progress`: the description of a skip_corrupt scan's progress bar, if one.
_scan_bar: ContextVar[str | None] = ContextVar("_scan_bar", default=None)

logger = logging.getLogger(__name__)


# How strings are stored as bytes: a file name that is no UTF-8 (a Windows zip's cp1252
# `café.jpg` unpacked on Linux), which Python holds as surrogate escapes, round-trips.
_ENCODING, _ERRORS = "utf-8", "surrogateescape"


class StringTable(Sequence[str]):
    """Read-only list of strings packed into one byte buffer plus offsets."""

    def __init__(self, items: Sequence[str]) -> None:
        encoded = [item.encode(_ENCODING, _ERRORS) for item in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} strings")
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode(_ENCODING, _ERRORS)

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass
class Entry:
    """One listed image, with where it was listed (e.g. 'train.txt:12') for messages."""

    path: str
    label: int
    unique_id: int
    source: str


def check_image(path: str) -> str | tuple[int, int]:
    """Why `path` cannot be decoded, or its (width, height) as decoded (EXIF orientation
    applied) if it can.

    Cheap but real: JPEGs are decoded at reduced scale (which still reads every
    byte, so truncation shows), other formats fully.
    """
    try:
        data = read_image_file(path)
    except OSError as exc:
        return unreadable_reason(path, exc)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            check_image_size(width, height)
            turned = image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS
            image.draft("RGB", (64, 64))
            image.load()
    except UnidentifiedImageError:
        return f"cannot decode image: {unidentified_reason(data)}"  # as the loader says
    except UnreadableImageError as exc:
        return str(exc)
    except Exception as exc:  # any failure means the loader would fail too
        return f"{type(exc).__name__}: {exc}"
    return (height, width) if turned else (width, height)


def check_images(paths: Sequence[str]) -> Iterator[str | tuple[int, int]]:
    """`check_image` of each path, yielded in order as threads finish them.

    Only a few checks per thread are queued at a time, and an interrupt cancels those, so
    Ctrl-C on a big dataset stops within a few checks rather than after all of them.
    """
    workers = min(16, 2 * (os.cpu_count() or 1))
    window = 4 * workers
    pending: deque[Future[str | tuple[int, int]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for path in paths:
            if len(pending) == window:
                yield pending.popleft().result()
            pending.append(pool.submit(check_image, path))
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


@contextmanager
def scan_progress(description: str | None) -> Iterator[None]:
    """Within it, a skip_corrupt start-up scan (a decode of every image: minutes on a big
    dataset) draws a progress bar with this description; None: no bar. A dataset is built
    from its config's keys, with no argument for it: its builder (the engine, which knows
    --no-progress, whether stderr is a terminal and the rank) sets this around the build."""
    token = _scan_bar.set(description)
    try:
        yield
    finally:
        _scan_bar.reset(token)


@contextmanager
def reused_scans() -> Iterator[None]:
    """Within it, a dataset built again over the same listed paths reuses the first build's
    start-up scan (a file check of every image, with skip_corrupt a decode of every image:
    minutes on a big dataset) instead of repeating it. `shitu train` with a LinearProbe
    builds its datasets three times (check, probe, fine-tuning).

    The scan depends on the listed paths only, so it is keyed on them: a listing changed to
    list other images is scanned again. Assumes the images themselves do not change within
    the block: one that breaks later fails when it is loaded, as after any start-up check.
    Outside the block (library use) every build scans."""
    global _scans
    outer = _scans
    if outer is None:
        _scans = OrderedDict()
    try:
        yield
    finally:
        _scans = outer


def _scan_paths(paths: Sequence[str], skip_corrupt: bool) -> Scan:
    """The missing files among `paths`, and with `skip_corrupt` the undecodable ones and
    the others' sizes; within `reused_scans`, from an earlier scan of the same paths when
    there was one."""
    if _scans is None:
        return _scan(paths, skip_corrupt)
    digest = hashlib.sha256("\0".join(paths).encode("utf-8", "surrogatepass")).digest()
    key = (skip_corrupt, os.getcwd(), digest)  # relative paths name other files elsewhere
    if key in _scans:
        _scans.move_to_end(key)
        return _scans[key]
    scan = _scans[key] = _scan(paths, skip_corrupt)
    if len(_scans) > _SCANS_KEPT:
        _scans.popitem(last=False)
    return scan


def _not_a_file(path: str) -> str:
    """Why the listed `path`, no regular file, is no image to read: _NOT_FOUND, or what is
    there instead (a folder was said to be "not found")."""
    if os.path.isdir(path):
        return "a folder, not an image file"
    return "not a regular file" if os.path.exists(path) else _NOT_FOUND


def _scan(paths: Sequence[str], skip_corrupt: bool) -> Scan:
    missing = [(i, _not_a_file(path)) for i, path in enumerate(paths) if not os.path.isfile(path)]
    if not skip_corrupt:
        return Scan(tuple(missing), None)
    gone = {i for i, _ in missing}
    present = [i for i in range(len(paths)) if i not in gone]
    undecodable = []
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    description = _scan_bar.get()
    checks = check_images([paths[i] for i in present])
    with ImageProgress(len(present), description is not None, description) as bar:
        for i, found in zip(present, checks, strict=True):
            if isinstance(found, str):
                undecodable.append((i, found))
                bar.skip()
            else:
                sizes[i] = found
                bar.update(1)
    return Scan((*missing, *undecodable), sizes)


def _described(entry: Entry, why: str) -> str:
    """`PATH (LISTED: WHY)`, for a message naming an image left out; where it is listed is
    left out where that is the path itself (an image folder's images)."""
    listed = "" if entry.source == entry.path else f"{entry.source}: "
    return f"{entry.path} ({listed}{why})"


class ImageDataset(Dataset):
    """Base class: subclasses parse their listing into `Entry`s and call `_set_entries`.

    Attributes the engine and samplers use: `paths`, `labels` (list of int),
    `unique_ids`, `has_unique_ids` (True when the listing gave ids, False when
    they are line numbers), `num_classes`, `class_names` (or None when the
    listing has bare numbers), `label_keys` (by class id, the listed label it
    numbers: a class name, or an integer id that `relabel` renumbered; None when
    labels are the listed ids themselves), `skipped` (path, reason) pairs left out
    by `skip_corrupt`.

    A dataset numbers only the labels it lists, so two datasets (a query and a
    gallery set) can give one number to two classes: evaluation matches their
    labels through `label_keys`.

    `skip_corrupt`: False (default) stops at start-up on missing files and at
    load time on an undecodable image, with a `DataError` naming the file. True
    checks every listed image at start-up (a reduced-scale decode, in threads),
    leaves out missing and undecodable ones, and those of a size the transforms
    cannot take (too elongated to resize, smaller than a crop), and records them in
    `skipped`; an image that still fails later raises `DataError` all the same.
    """

    def __init__(
        self,
        transform_ops: TransformOps | None,
        skip_corrupt: bool,
        where: str,
    ) -> None:
        self.where = where
        # The config section it was built from ("DataLoader.Train.dataset"), which the
        # advice to set skip_corrupt names, set by `build_dataset`; None where built directly.
        self.config_key: str | None = None
        self.skip_corrupt = skip_corrupt
        self.transform: Compose = build_transforms(transform_ops)
        self.skipped: list[tuple[str, str]] = []
        # Of `skipped`, the missing and undecodable images by path, with why: unusable by
        # any dataset (unlike an image too small for this one's crop).
        self.unreadable: dict[str, str] = {}
        self.class_names: list[str] | None = None
        self.label_keys: list[str] | list[int] | None = None
        self.num_classes = 0
        self.has_unique_ids = False

    def _set_entries(self, entries: list[Entry], image_root: str | None = None) -> None:
        if not entries:
            raise DataError(f"{self.where}: lists no images")
        labels, ids = (self._int64_column(entries, field) for field in ("label", "unique_id"))
        self._warn_of_repeats(entries)
        scan = _scan_paths([entry.path for entry in entries], self.skip_corrupt)
        problems = scan.problems
        if problems and not self.skip_corrupt:  # missing files: the only problem looked for
            self._refuse_missing(entries, problems, image_root)
        self.unreadable.update((entries[i].path, why) for i, why in problems)
        problems += self._size_problems(scan)
        self.skipped.extend((entries[i].path, why) for i, why in problems)
        if len(problems) == len(entries):
            self._refuse_all_skipped(entries, problems, image_root)
        if problems:
            self._warn_of_skipped(entries, problems)
        dropped = {i for i, _ in problems}
        kept = [i for i in range(len(entries)) if i not in dropped]
        self.paths = StringTable([entries[i].path for i in kept])
        self._labels, self._ids = labels[kept], ids[kept]

    def _int64_column(self, entries: list[Entry], field: str) -> np.ndarray:
        """The entries' `field` (label or unique_id) as int64, as they are kept: a listed
        value beyond it (20 digits, two product codes run together) was an OverflowError
        naming no line."""
        try:
            return np.fromiter((getattr(e, field) for e in entries), np.int64, len(entries))
        except OverflowError:
            info = np.iinfo(np.int64)
            entry = next(e for e in entries if not info.min <= getattr(e, field) <= info.max)
            raise DataError(
                f"{self.where}: {entry.source}: {field.replace('_', ' ')} "
                f"{getattr(entry, field)} does not fit the 64-bit integer it is kept in "
                f"({info.min} to {info.max})"
            ) from None

    def _warn_of_repeats(self, entries: list[Entry]) -> None:
        """An image listed twice is drawn twice as often, and one listed under two labels
        (label files merged, a relabelling half done) is trained towards both classes and
        counted in both in evaluation. Either may be meant (oversampling a class), so it is
        kept, but said: how many, and where the first few are listed, those under
        different labels first."""
        paths = [os.path.normpath(entry.path) for entry in entries]
        if len(set(paths)) == len(paths):  # the usual case, at a third of the cost
            return
        listings: dict[str, list[Entry]] = {}
        for path, entry in zip(paths, entries, strict=True):
            listings.setdefault(path, []).append(entry)
        repeated = [listed for listed in listings.values() if len(listed) > 1]
        if not repeated:
            return
        conflicting = [listed for listed in repeated if len({e.label for e in listed}) > 1]
        agreeing = [listed for listed in repeated if len({e.label for e in listed}) == 1]
        shown = (conflicting + agreeing)[:_SHOW_REPEATED]
        examples = "; ".join(
            f"{listed[0].path} ({', '.join(self._listing_text(e) for e in listed)})"
            for listed in shown
        )
        logger.warning(
            "%s: %d image%s listed more than once, %d under different labels (%s%s); each "
            "listing is a sample of its own",
            self.where,
            len(repeated),
            " is" if len(repeated) == 1 else "s are",
            len(conflicting),
            examples,
            "; ..." if len(repeated) > len(shown) else "",
        )

    def _listing_text(self, entry: Entry) -> str:
        """Where `entry` is listed, and its label as listed: a class name, or a class id."""
        keys = self.label_keys if self.label_keys is not None else self.class_names
        label = keys[entry.label] if keys is not None and entry.label < len(keys) else entry.label
        return f"{entry.source}: {label}"

    def _size_problems(self, scan: Scan) -> Problems:
        """The decoded images of a size this dataset's transforms cannot take (a photo one
        pixel wide, say), which would otherwise stop a run when first loaded."""
        if scan.sizes is None:
            return ()
        unusable = {i for i, _ in scan.problems}
        problems = []
        for i, (width, height) in enumerate(scan.sizes.tolist()):
            why = None if i in unusable else self.transform.size_problem(width, height)
            if why:
                problems.append((i, why))
        return tuple(problems)

    def _refuse_missing(
        self, entries: list[Entry], missing: Problems, image_root: str | None
    ) -> NoReturn:
        """Refuse the `missing` of `entries` (no file at their path), each named with where
        it is listed, and with what is there where any is something (`_not_a_file`)."""
        none = all(why == _NOT_FOUND for _, why in missing)
        examples = first_few(
            [
                f"{entries[i].path} ({entries[i].source}{'' if none else f': {why}'})"
                for i, why in missing
            ],
            _SHOW,
        )
        raise DataError(
            f"{self.where}: {len(missing)} of {len(entries)} listed images "
            f"{'do not exist' if none else 'are not image files'}: {examples}"
            f"{_not_found_hint([entries[i].path for i, _ in missing], image_root)} "
            "(skip_corrupt: true leaves them out)"
        )

    def _warn_of_skipped(self, entries: list[Entry], problems: Problems) -> None:
        """Name the images skip_corrupt left out, and why: a training summary only counted
        them, and an evaluation set said nothing at all, its metrics quietly over fewer
        queries or gallery images (a file truncated by a copy, say, is to be put right)."""
        examples = first_few([_described(entries[i], why) for i, why in problems], _SHOW)
        logger.warning(
            "%s: skip_corrupt left out %d of %d listed images: %s",
            self.where,
            len(problems),
            len(entries),
            examples,
        )

    def _refuse_all_skipped(
        self, entries: list[Entry], problems: Problems, image_root: str | None
    ) -> NoReturn:
        """skip_corrupt left every image out: say why, with the first few reasons (all
        missing: a wrong image_root, most often; all smaller than a crop, yet readable),
        not only that there is nothing left."""
        examples = first_few([_described(entries[i], why) for i, why in problems], _SHOW)
        missing = [entries[i].path for i, why in problems if why == _NOT_FOUND]
        raise DataError(
            f"{self.where}: none of the {len(entries)} listed images can be used: "
            f"{examples}{_not_found_hint(missing, image_root) if missing else ''}"
        )

    @cached_property
    def labels(self) -> list[int]:
        return self._labels.tolist()

    @cached_property
    def listing_digest(self) -> str:
        """A digest of the images' file names and labels, in order: what a resumed run
        must find again to draw the batches it would have. File names rather than paths,
        so that the same data moved to another folder is still the same. Computed once:
        every checkpoint records it."""
        digest = hashlib.sha256()
        for path, label in zip(self.paths, self._labels.tolist(), strict=True):
            digest.update(f"{os.path.basename(path)}\t{label}\n".encode(_ENCODING, _ERRORS))
        return digest.hexdigest()

    @cached_property
    def unique_ids(self) -> list[int]:
        return self._ids.tolist()

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path = self.paths[index]
        try:
            data = read_image_file(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read the image ({exc.strerror or exc})") from exc
        try:
            image = self.transform(data)
        except UnreadableImageError as exc:
            key = self.config_key
            setting = f"{key} (-o {key}.skip_corrupt=true)" if key else "the dataset config"
            hint = (
                " (it passed the start-up check, so it changed since)"
                if self.skip_corrupt
                else f"; set skip_corrupt: true in {setting} to leave such images out"
            )
            raise DataError(f"{path}: {exc}{hint}") from exc
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
        return image, int(self._labels[index]), int(self._ids[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.where}: {len(self)} images, {self.num_classes} classes"
            f"{f', {len(self.skipped)} skipped' if self.skipped else ''})"
        )


# How a file's name found in Unicode normal form NFC or NFD encodes its accented letters,
# against the list that names it in the other.
_ENCODED = {
    "NFC": "composed (Unicode NFC) where the list has them decomposed (NFD)",
    "NFD": "decomposed (Unicode NFD, as macOS names files) where the list has them composed",
}


def _not_found_hint(missing: Sequence[str], image_root: str | None) -> str:
    """What to add to a message about the `missing` listed paths: where listed paths are
    looked for, and that a backslash separates no folders here (a list a Windows script
    wrote with os.path.join: `train\\apple\\1.jpg`)."""
    hint = f"; paths are read relative to image_root={image_root!r}" if image_root else ""
    if os.sep == "/" and any("\\" in path for path in missing):
        hint += "; a backslash separates no folders here: write the paths with '/'"
    # Listed as typed (é one character) but named as macOS writes it (e and an accent), or
    # the other way round: the message showed two paths that look the same.
    for path in missing:
        for form in ("NFC", "NFD"):
            other = normalize(form, path)
            if other != path and os.path.isfile(other):
                return (
                    f"{hint}; {other} is there, its accented letters {_ENCODED[form]}: list "
                    "the names as the files have them, or rename the files"
                )
    return hint


def read_lines(
    path: str, what: str, image_root: str | None = None, delimiter: str | None = None
) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines of a listing file, less blank ones and
    `#` comments (a header line, say), which gallery label files may have as well: the
    same list then serves `shitu index build` and evaluation. With `image_root`, a comment
    whose first column (split by `delimiter`, None: whitespace) names an image there is
    warned of: a photo named `#1.jpg` was left out without a word."""
    try:
        text = read_listing_text(path, f"{what}: label file {path}")
    except UnicodeDecodeError:
        reason = undecodable_text_reason(path, "a text file listing images")
        raise DataError(f"{what}: label file {path} is {reason}") from None
    lines = [(number, line.strip()) for number, line in enumerate(text_lines(text), 1)]
    if image_root is not None:
        for number, line in lines:
            if line.startswith("#"):
                _warn_if_an_image_is_commented_out(path, number, line, image_root, delimiter)
    return [(number, line) for number, line in lines if line and not line.startswith("#")]


def _warn_if_an_image_is_commented_out(
    path: str, number: int, line: str, image_root: str, delimiter: str | None
) -> None:
    """Warn of the `#` line `number` of the listing at `path` where its first column (not
    the whole line: `# photos of 2024` names no file) is an image in `image_root`."""
    columns = line.split(delimiter, 1)
    head = columns[0].strip()
    if len(columns) == 2 and os.path.isfile(os.path.join(image_root, head)):
        logger.warning(
            "%s:%d: skipped as a comment (it starts with #), though %s is an image in "
            "image_root; to list it, write its path as ./%s",
            path,
            number,
            head,
            head,
        )


def refuse_a_header(
    listing: object, lines: list[tuple[int, str]], image_root: str, delimiter: str | None
) -> None:
    """Refuse a first line such as `path label`, a header, of the `read_lines` of `listing`
    (columns split by `delimiter`, None: whitespace), saying to comment it out: the error
    its columns gave instead (a class name among class ids, a missing image `path`) named
    the line but not what to do."""
    if len(lines) < 2:
        return
    (number, first), (_, second) = lines[:2]
    head = first.split(delimiter, 1)[0].strip()
    if is_header(first, second, os.path.isfile(os.path.join(image_root, head))):
        raise header_error(listing, number, first, head, "in image_root")


def check_root(root: str, what: str, key: str = "image_root") -> None:
    """Refuse a `root` that is no folder, saying what it is: "is not a directory" read alike
    for a mistyped path and a file given in its place."""
    path = Path(root)
    if path.is_dir():
        return
    if not path.exists():
        raise DataError(f"{what}: {key} {root}: no such folder{from_working_directory(root)}")
    kind = "a file" if path.is_file() else special_kind(path.stat())
    raise DataError(f"{what}: {key} {root} is {kind}, not a folder of images")
