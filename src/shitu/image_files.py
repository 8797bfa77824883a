"""Finding the images in a folder, the one scan behind every command and dataset given one.

A folder is searched recursively, through links to other folders. What is not taken is
reported in one warning per folder (a user who points at 1000 files and gets 950 embedded
must be told), except what is not meant as a photo: hidden files and folders (`.DS_Store`,
macOS's `._photo.jpg`, `.thumbnails/`) and sidecar files (SIDECAR_SUFFIXES: label lists,
annotations, photo metadata), which are left out quietly.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import reprlib
import warnings
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from shitu.errors import DataError
from shitu.fileio import SAVE_AS_UTF8, read_regular_file

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# Files that sit beside photos without being photos: label lists and notes (.txt .csv .tsv
# .md), detection or labelling annotations (.xml .json .yaml), photo-editor metadata (.xmp,
# Apple's .aae) and Windows' Thumbs.db / desktop.ini.
SIDECAR_SUFFIXES = frozenset(
    {".txt", ".csv", ".tsv", ".md", ".json", ".xml", ".yaml", ".yml", ".xmp", ".aae", ".db", ".ini"}
)

# Why a file given as an image cannot be read when it is text (a label list, say), and how
# much of it `is_text` reads to tell.
TEXT_FILE_REASON = "a text file, not an image"
TEXT_PROBE_BYTES = 4096
# The major brands (bytes 8-12 of an ISO media file, after `ftyp`) of the HEIF images phones
# take (HEIC, iPhones' default) and of AVIF, which Pillow reads only with a plug-in or not
# at all: such a file is named for what it is, not as corrupt or "not an image file".
ISO_MEDIA_BRANDS = {
    **dict.fromkeys((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"), "HEIC"),
    **dict.fromkeys((b"mif1", b"msf1"), "HEIF"),
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
}
# For a command that takes images, where a text file was given as one: usually a labelled
# list, meant for the command that reads those.
LABELLED_LIST_HINT = (
    "for a labelled list of `path<TAB>label` lines, use `shitu eval-pipeline --queries LIST`"
)


def is_header(line: str, following: str, found: bool) -> bool:
    """Whether a listing's first `line`, whose first column is no `found` file, is a
    header (`path label`): no word of it names an image, as a word of the next line does
    (a word, not a column: a line whose columns are split wrong still names its image)."""
    return not found and not _names_an_image(line) and _names_an_image(following)


# The header of the Grocery Store dataset's class table, classes.csv (`Class Name (str),Class
# ID (int),...`): a file given as a listing of images that starts so is that table.
_CLASS_TABLE_HEADER = re.compile(r"\s*class name \(str\)\s*,\s*class id \(int\)", re.IGNORECASE)


def header_error(listing: object, number: int, line: str, head: str, place: str) -> DataError:
    """The refusal of a header line (see `is_header`) that says how to keep it: as a
    comment. `head`: its first column, no image `place` ("beside the file"). The header of
    a class table is not advised so: commented out, its rows were refused next."""
    if _CLASS_TABLE_HEADER.match(line):
        return DataError(
            f"{listing}:{number}: a table of class names and ids (the Grocery Store "
            "dataset's classes.csv, by its header), not a listing of images and their labels "
            "(that dataset's are train.txt, val.txt and test.txt)"
        )
    return DataError(
        f"{listing}:{number}: {line!r} looks like a header, not an image and its label (no "
        f"image {head!r} {place}); start the line with # to comment it out"
    )


def _names_an_image(line: str) -> bool:
    """Whether a word of `line` is an image's name; words end at commas and semicolons too,
    as `a.png,0` (a listing with `delimiter: ","`) names a.png."""
    words = re.split(r"[\s,;]+", line)
    return any(Path(word.strip("'\"")).suffix.lower() in IMAGE_SUFFIXES for word in words)


def undecodable_text_reason(path: str | os.PathLike, expected: str) -> str:
    """Why a file meant to be `expected` text did not decode: an image given in its place,
    which no re-saving makes text, or text in another encoding, to be saved as UTF-8."""
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return f"an image, not {expected}"
    return f"not UTF-8 or UTF-16 text: {SAVE_AS_UTF8}"


def unreadable_reason(path: str | os.PathLike, exc: OSError) -> str:
    """Why the image file at `path` could not be read, as reported for it: a folder is
    named as one, with how to list its images (the OS says only "Is a directory", or on
    Windows "Permission denied"), so every API that reads image files says the same."""
    if os.path.isdir(path):
        return (
            "a folder, not an image file: pass the images in it "
            "(shitu.image_files.scan_images(Path(folder)) lists them)"
        )
    return exc.strerror or str(exc)


# The largest image file read at the default pixel limit (250 megapixels,
# `shitu.data.transforms.ops.max_image_pixels`): an image of that many pixels fits even
# stored uncompressed at 8 bytes a pixel (16-bit RGBA TIFF: 2.0 GB). A higher limit
# ($SHITU_MAX_MEGAPIXELS) raises it in proportion (`max_image_file_bytes`). Pillow's
# decompression-bomb guard (which that pixel limit replaces) and the server's
# --max-upload-mb bound pixels and request bodies only: a file was read whole into memory
# before either could refuse it.
MAX_IMAGE_FILE_BYTES = 2 << 30


def max_image_file_bytes() -> int:
    """The largest image file read: MAX_IMAGE_FILE_BYTES, raised in proportion to a pixel
    limit above the default, so that an image allowed by $SHITU_MAX_MEGAPIXELS is not
    refused for its file size (read at each call, as the pixel limit is)."""
    # Imported here: shitu.data.transforms.ops, where the pixel limit is, imports this module.
    from shitu.data.transforms.ops import DEFAULT_MAX_MEGAPIXELS, max_image_pixels

    growth = max(1.0, max_image_pixels() / (DEFAULT_MAX_MEGAPIXELS * 1_000_000))
    return int(MAX_IMAGE_FILE_BYTES * growth)


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of the image file at `path`, read only where it is a regular file of at
    most `max_image_file_bytes` (see `read_regular_file`): `/dev/zero` was read until
    memory ran out. Raises OSError, whose strerror says why not (see `unreadable_reason`)."""
    remedy = "SHITU_MAX_MEGAPIXELS raises it, with the pixel limit"
    return read_regular_file(path, "an image file", max_image_file_bytes(), remedy)


def iso_media_kind(data: bytes) -> str | None:
    """ "HEIC", "HEIF" or "AVIF" for a file of those formats (from its first 12 bytes), else
    None."""
    return ISO_MEDIA_BRANDS.get(data[8:12]) if data[4:8] == b"ftyp" else None


def holds_an_image(path: str | os.PathLike) -> bool:
    """Whether a file named without an image suffix is an image all the same, by its
    content: a phone's `.HEIC` photo, a `.gif`. Given by name, such a file is to be read
    (and refused, where it must be, for its format) as an image, not as a label file. Text,
    as label files are (with a BOM too), never counts as one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(TEXT_PROBE_BYTES)
    except OSError:
        return False
    boms = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    if not head or is_text(head) or head.startswith(boms):
        return False
    if iso_media_kind(head) is not None:
        return True
    from PIL import Image  # here: scans need no decoder

    try:
        # Pillow warns of an image over its pixel limit on opening it; a probe that only
        # tells an image from a label file has nothing to warn of (reading it is shitu's
        # own check), and scans may run before shitu lifts that limit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except Image.DecompressionBombError:  # an image, too large for Pillow's own check
        return True
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        return False


# How many skipped paths the warning shows.
_EXAMPLES = 3

# What `_kind` calls a file that is taken, and one left out quietly (hidden, sidecar).
_IMAGE, _QUIET = "image", "quiet"


def scan_images(
    folder: Path,
    suffixes: Collection[str] = IMAGE_SUFFIXES,
    loose: bool = True,
    foreign: Mapping[str, str] | None = None,
) -> list[Path]:
    """The image files under `folder` (suffixes compared lower-case), as found (`folder /
    relative path`, links not resolved), in an order that keeps ids and training runs
    reproducible: a folder's files by name, then its sub-folders by name. `loose=False` is
    for folder-per-label trees: only images inside sub-folders are taken. `foreign` maps
    the name of a file to what a folder holding it is ("a gallery library"): such folders,
    `folder` too, are skipped, as their images are not the photos the tree is of.

    Warns once about the rest (see the module docstring); no image at all is an error
    naming the folder, as there is nothing the command could do with it.
    """
    images: list[Path] = []
    skipped: list[tuple[Path, str]] = []

    def unreadable(error: OSError) -> None:
        skipped.append((Path(error.filename), "unreadable folder"))

    scanned: set[Path] = set()  # real folders, so that links cannot loop or repeat them
    for top, folders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        here = Path(top)
        scanned.add(here.resolve())
        owner = foreign_kind(here, foreign or {})
        if owner is not None:
            skipped.append((here, owner))
            folders.clear()
            continue
        kept = []
        for name in sorted(folders):
            link = here / name
            if name.startswith("."):
                continue
            if link.is_symlink() and link.resolve() in scanned:
                skipped.append((link, "link to a folder scanned already"))
            else:
                kept.append(name)
        folders[:] = kept  # os.walk descends into these only, in this order
        for name in sorted(files):  # every other entry: files, broken links, devices
            path = here / name
            kind = _QUIET if name.startswith(".") else _kind(path, suffixes)
            if kind == _IMAGE and not loose and here == folder:
                kind = "not in a label folder"
            if kind == _IMAGE:
                images.append(path)
            elif kind != _QUIET:
                skipped.append((path, kind))
    if skipped:
        logger.warning("%s", _skipped_message(folder, skipped, suffixes))
    if not images:
        where = "in this folder" if loose else "in its label sub-folders (FOLDER/LABEL/IMAGE)"
        raise DataError(f"{folder}: no images {where}")
    return images


def warn_if_grouped(root: Path, images: Sequence[Path], remedy: str) -> None:
    """For a folder-per-label tree (`scan_images(root, loose=False)`'s `images`): warn
    where the folders the images are in have more names than the first-level folders that
    label them, most likely categories over products (the Grocery Store Dataset's
    `Fruit/Apple/Golden-Delicious/`), with the `remedy` that labels them by the folder
    each image is in ("give --leaf-labels")."""
    labels = sorted({image.relative_to(root).parts[0] for image in images})
    folders = sorted({image.parent for image in images})
    leaf_names = {folder.name for folder in folders}
    if len(leaf_names) <= len(labels):
        return
    nested = [folder.relative_to(root) for folder in folders if folder.parent != root]
    shown = ", ".join(labels[:_EXAMPLES]) + (", ..." if len(labels) > _EXAMPLES else "")
    logger.warning(
        "%s: each first-level folder is a label (%d: %s), but the images lie in folders below "
        "them (%s, ...): to label each image by the folder it is in instead (%d labels), %s",
        root,
        len(labels),
        shown,
        nested[0],
        len(leaf_names),
        remedy,
    )


def warn_of_shared_folder_names(root: Path, folders: Iterable[Path]) -> None:
    """Where images are labelled by the folder they are in: warn of folders of one name
    in different places (`Apple/Red/`, `Pepper/Red/`), whose images share a label."""
    places: defaultdict[str, list[Path]] = defaultdict(list)
    for folder in sorted(folders):
        places[folder.name].append(folder.relative_to(root))
    shared = [(name, paths) for name, paths in places.items() if len(paths) > 1]
    if shared:
        shown = "; ".join(
            f"{name} ({', '.join(map(str, paths))})" for name, paths in shared[:_EXAMPLES]
        )
        more = f"; {len(shared) - _EXAMPLES} more" if len(shared) > _EXAMPLES else ""
        logger.warning("%s: folders of the same name share their label: %s%s", root, shown, more)


def foreign_kind(folder: Path, foreign: Mapping[str, str]) -> str | None:
    """What `folder` is by the first of `foreign`'s files it holds, else None."""
    return next((kind for name, kind in foreign.items() if (folder / name).is_file()), None)


def _kind(path: Path, suffixes: Collection[str]) -> str:
    """_IMAGE, _QUIET, or why else `path` is not taken (its suffix, say)."""
    suffix = path.suffix.lower()
    if not path.exists():  # a link whose target is gone
        return "broken link"
    if suffix in suffixes:
        return _IMAGE if path.is_file() else "not a regular file"
    if suffix in SIDECAR_SUFFIXES:
        return _QUIET
    return suffix or "no extension"


def _skipped_message(
    folder: Path, skipped: list[tuple[Path, str]], suffixes: Collection[str]
) -> str:
    """One line: how many, of which kinds, a few examples, and what would have been read."""
    skipped = sorted(skipped)
    kinds = ", ".join(
        f"{kind} x{count}" for kind, count in Counter(r for _, r in skipped).most_common()
    )
    examples = ", ".join(str(path) for path, _ in skipped[:_EXAMPLES])
    more = ", ..." if len(skipped) > _EXAMPLES else ""
    count = len(skipped)
    return (
        f"skipped {count} file{'' if count == 1 else 's'} in {folder} ({kinds}; e.g. "
        f"{examples}{more}); images are read from {' '.join(sorted(suffixes))} files"
    )


def is_text(data: bytes) -> bool:
    """Whether file bytes are plain text: UTF-8 without NUL bytes in their first
    TEXT_PROBE_BYTES (a character cut at that end still counts as text)."""
    head = data[:TEXT_PROBE_BYTES]
    if not head or b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return False
    return True


def path_list(paths: Sequence[str | bytes | os.PathLike]) -> list[str]:
    """`paths` as strings (bytes ones, as `os.listdir(b".")` gives them, decoded as the file
    system names them, not written as their repr); one path passed alone is refused with
    the reason (iterating it would take each of its characters for a file name), and an
    item that is no path (None, a decoded image) naming it, not in a TypeError of os's."""
    if isinstance(paths, str | bytes | os.PathLike):
        single = os.fsdecode(paths)
        raise DataError(f"expected a list of image paths, got the single path {single!r}")
    if not isinstance(paths, Iterable):  # None, a number: Python's TypeError names no path
        raise DataError(f"expected a list of image paths, got {type(paths).__name__} {paths!r}")
    names = []
    for index, path in enumerate(paths):
        if not isinstance(path, str | bytes | os.PathLike):
            shown = " ".join(reprlib.repr(path).split())  # an array's repr spans lines
            raise DataError(
                f"expected a list of image paths; item {index} (from 0) is not one: {shown} "
                f"({type(path).__name__})"
            )
        names.append(os.fsdecode(path))
    return names
