"""Finding gallery images: `path<TAB>label` files, folder-per-label trees, plain folders."""

from __future__ import annotations

import logging
import os
import shlex
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import cast

from shitu.errors import DataError, first_few
from shitu.fileio import (
    SAVE_AS_UTF8,
    is_given_path,
    listed_file,
    path_exists,
    read_text,
    refuse_url,
    special_kind,
    text_lines,
)
from shitu.image_files import (
    IMAGE_SUFFIXES,
    header_error,
    holds_an_image,
    is_header,
    scan_images,
    warn_if_grouped,
    warn_of_shared_folder_names,
)

logger = logging.getLogger(__name__)


# Unicode categories of tabs, line breaks and other control characters (C0 and C1, and
# U+2028/U+2029, which some readers end lines at too)
LINE_BREAKING = ("Cc", "Zl", "Zp")


@dataclass(frozen=True)
class GalleryItem:
    """An image file to add and the label it gets."""

    path: Path
    label: str


class BadLabelError(DataError):
    """A label that cannot be stored: empty, or not one line of printable text."""


def normal_form(label: str) -> str:
    """How labels compare: Unicode NFC, so that a name typed on a keyboard and the same
    name from a file system that keeps accents decomposed (macOS) are one label."""
    return unicodedata.normalize("NFC", label)


def breaks_lines(text: str) -> bool:
    """Whether `text` holds a tab, a line break or another control character: one that
    would split a `path<TAB>label` line or a line of `shitu index list` in two."""
    return any(unicodedata.category(char) in LINE_BREAKING for char in text)


def check_label(label: str) -> str:
    """A label as stored: trimmed, non-empty, one line of text (label files are
    `path<TAB>label` lines, and `index list`/`search` print one label per line), NFC. A
    whole number (a class id) is its decimal text; anything else that is not text (None,
    bytes, a float) is refused rather than stored as its repr."""
    if isinstance(label, Integral) and not isinstance(label, bool):
        label = str(int(label))
    if not isinstance(label, str):
        raise BadLabelError(f"a label is text, got {type(label).__name__} {label!r}")
    label = normal_form(label.strip())
    if not label:
        raise BadLabelError("the label is empty")
    if breaks_lines(label):
        raise BadLabelError(
            f"the label {label!r} must not contain tabs, line breaks or other control characters"
        )
    if any(unicodedata.category(char) == "Cs" for char in label):
        # Lone surrogates: bytes of another encoding (a Latin-1 terminal's `--label`, Python
        # decodes them so), or a JSON `\udce9` escape; no UTF-8 text, which SQLite stores.
        raise BadLabelError(
            f"the label {label!r} is not UTF-8 text (typed or saved in another encoding?)"
        )
    return label


def collected_from(images: Iterable[tuple[str, str]], target: Path | None = None) -> set[Path]:
    """The folders that gallery images, (path, label) pairs, were most likely collected
    from, which a later `shitu index add` or build of the same folder scans again: from
    the folder named after an image's label (its label folder), else the folder the image
    is in (images given one label, or listed in a label file), up through every folder
    whose sub-folders all hold gallery images: the root of a folder-per-label tree, of one
    grouped by category too, but not a folder holding others as well (`~`, for `~/Kiwi`
    given with `--label Kiwi`). `target`: a folder to be checked against them (absolute),
    counted as one of a tree's: made for the check, or left by an earlier run, it would
    keep the folder it is in from counting as the root."""
    pairs = {(Path(path).parent, label) for path, label in images if path}
    holding = {folder for parent, _ in pairs for folder in (parent, *parent.parents)}
    holding |= set() if target is None else {target, *target.parents}
    only_gallery: dict[Path, bool] = {}  # by folder: all its sub-folders hold gallery images

    def root(folder: Path) -> Path:
        while folder.parent != folder:
            above = folder.parent
            if above not in only_gallery:
                only_gallery[above] = _sub_folders_within(above, holding)
            if not only_gallery[above]:
                break
            folder = above
        return folder

    return {
        root(next((f for f in (parent, *parent.parents) if normal_form(f.name) == label), parent))
        for parent, label in pairs
    }


def _sub_folders_within(folder: Path, folders: set[Path]) -> bool:
    """Whether every sub-folder of `folder` (hidden ones aside, as scans leave them out) is
    one of `folders`; False where it cannot be listed."""
    try:
        return all(
            entry in folders
            for entry in folder.iterdir()
            if not entry.name.startswith(".") and entry.is_dir()
        )
    except OSError:
        return False


def parse_label_file(path: Path, resolve: bool = True) -> list[GalleryItem]:
    """PP-ShiTu gallery list: `path<TAB>label` per line, paths relative to the file's folder
    (joined to it, and resolved where `resolve`: see `collect_items`).

    Labels may contain spaces (not tabs); columns after the label are ignored, as PaddleClas
    does; blank and `#` lines are skipped (one naming a file that is there, `#1.jpg`, with a
    warning: `./#1.jpg` lists it). A relative path that is missing beside the file
    but present from the working directory is refused with that said: every image of such
    a list would otherwise fail one by one; so is a folder. A path written with Windows'
    separators (`images\\apple.jpg`, as a list made on Windows has them) is found on other
    systems too.
    """
    try:
        text = read_text(path)
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not a label file (not UTF-8 or UTF-16 text); if it is one, {SAVE_AS_UTF8}"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc.strerror}") from None
    _refuse_a_header(path, text)
    items = []
    for number, line in enumerate(text_lines(text), start=1):
        if line.startswith("#"):  # a comment
            _warn_if_a_file_is_commented_out(path, number, line)
            continue
        if not line.strip():
            continue
        # Later columns (an id, say) are ignored, as PaddleClas does
        image, label, *_ = [*line.rstrip().split("\t"), ""]
        if not image.strip() or not label.strip():
            raise DataError(
                f"{path}:{number}: expected `path<TAB>label`, got {line!r} "
                f"({_missing_column(line, image)}){_grocery_list_hint(path, line)}"
            )
        try:
            label = check_label(label)
        except BadLabelError as exc:
            raise DataError(f"{path}:{number}: {exc}") from None
        image = image.strip()
        full = listed_file(path.parent, image)
        exists = path_exists(full)  # one look a line, for the checks below
        if not exists and path_exists(Path(image)):
            raise DataError(
                f"{path}:{number}: {image} is not in {path.parent.resolve()} but is in the "
                "working directory; paths in a label file are relative to its folder (or "
                "absolute)"
            )
        if not exists and _names_an_image(path.parent, label):
            # `label<TAB>path` (a table exported in that order): every line failed as a
            # missing file named after its label, and nothing said the columns were swapped.
            # Only a label naming an image there counts: one missing image labelled
            # `logo.png` is that line's failure (warned of when read), not the whole file's.
            raise DataError(
                f"{path}:{number}: expected `path<TAB>label`, got {line!r}: the label names "
                f"an image and the path ({image}) no file; are the columns the other way round?"
            )
        # else skipped when read, with advice for Python callers
        if exists and full.is_dir():
            raise DataError(
                f"{path}:{number}: {image} is a folder; a label file lists image files, one a "
                "line (a folder of images is given to the command itself, with --label LABEL "
                "where it takes one, or as FOLDER/LABEL/IMAGE)"
            )
        items.append(GalleryItem(_found(full, resolve), label))
    return items


def _names_an_image(folder: Path, label: str) -> bool:
    """Whether a label file's label is the path of an image file in `folder`, as a file
    written `label<TAB>path` has; a label too long for a file name names none."""
    if Path(label).suffix.lower() not in IMAGE_SUFFIXES:
        return False
    listed = listed_file(folder, label)  # labels may be longer than a file name can be
    return path_exists(listed) and listed.is_file()


def _refuse_a_header(path: Path, text: str) -> None:
    """Refuse a first line such as `path<TAB>label`, a header, saying to comment it out: it
    was refused for want of a tab, or warned of as an image that is not there."""
    listed = [
        (number, line)
        for number, line in enumerate(text_lines(text), start=1)
        if line.strip() and not line.startswith("#")
    ]
    if len(listed) < 2:
        return
    (number, first), (_, second) = listed[:2]
    head = first.split("\t", 1)[0].strip()
    if is_header(first, second, path_exists(listed_file(path.parent, head))):
        raise header_error(path, number, first, head, "beside the file")


def _warn_if_a_file_is_commented_out(path: Path, number: int, line: str) -> None:
    """Warn of a `#` line, a comment, whose path names a file beside the list: a photo named
    `#1.jpg` would otherwise be left out of the gallery without a word."""
    image = line.split("\t", 1)[0].strip()
    listed = listed_file(path.parent, image)
    if "\t" in line and path_exists(listed) and listed.is_file():
        logger.warning(
            "%s:%d: skipped as a comment (it starts with #), though %s is a file there; "
            "to list it, write its path as ./%s",
            path,
            number,
            image,
            image,
        )


def _missing_column(line: str, image: str) -> str:
    """What a label file's line lacks: a line with a tab but nothing after it has no label,
    not no tab (the trailing tab is easily missed, being invisible)."""
    if "\t" not in line:
        return "no tab: paths and labels may contain spaces, so only a tab separates them"
    return "no path before the tab" if not image.strip() else "no label after the tab"


def _grocery_list_hint(listing: Path, line: str) -> str:
    """Where `line` is a Grocery Store Dataset list's (`path, class_id, coarse_id`, for
    training and evaluation), how to build a gallery of its photos instead: such a list
    names classes by number, and its photos are labelled by the folders they are in."""
    fields = [field.strip() for field in line.split(",")]
    if "\t" in line or len(fields) != 3 or not all(f.isdigit() for f in fields[1:]):
        return ""
    parts = Path(fields[0]).parts
    folder = listing.parent / parts[0] if len(parts) > 1 else listing.parent
    return (
        "; a Grocery Store Dataset list (`path, class_id, coarse_id`, for `shitu train` "
        "and `shitu eval`) has no label names: build from its photos' folder, each photo "
        f"labelled by the folder it is in, `shitu index build {shlex.quote(str(folder))} "
        "--leaf-labels --out LIB`"
    )


def scan_label_folders(
    root: Path, one_label_option: bool = True, leaf_labels: bool = False, resolve: bool = True
) -> list[GalleryItem]:
    """Folder-per-label tree: every image under `root/<label>/` gets that label; with
    `leaf_labels`, the name of the folder it is in, for trees grouped by category
    (`Fruit/Apple/Golden-Delicious/1.jpg`: Golden-Delicious, not Fruit).

    A folder of photos without label folders is most often one product's photos: the
    error says how to give them a label (`one_label_option`: the caller takes --label).
    A tree whose images lie deeper than its label folders is warned of where the folders
    they are in would give more labels (a grouped tree would quietly become a few labels);
    with `leaf_labels`, folders of one name in different places, which share a label.
    """
    try:
        images = scan_images(root, loose=False, foreign=gallery_libraries())
    except DataError as exc:
        if _has_loose_images(root):
            raise DataError(
                f"{exc}; the images directly in it have no label: move them into a sub-folder "
                f"named after their label, {_one_label_hint(one_label_option)}"
            ) from None
        raise
    if leaf_labels:
        warn_of_shared_folder_names(root, {image.parent for image in images})
        return [GalleryItem(_found(image, resolve), image.parent.name) for image in images]
    warn_if_grouped(root, images, "give --leaf-labels (leaf_labels=True in Python)")
    return [
        GalleryItem(_found(image, resolve), image.relative_to(root).parts[0]) for image in images
    ]


def _warn_of_one_label_over_folders(folder: Path, images: list[Path], label: str) -> None:
    """Warn where --label gives one label to a folder whose images all lie in two or more
    sub-folders: most likely a folder-per-label tree (`my_products/Apple/`), which without
    --label would be labelled by them. (Photos of one product in `front/` and `back/` are
    meant so: hence a warning.)"""
    if any(image.parent == folder for image in images):
        return
    names = sorted({image.relative_to(folder).parts[0] for image in images})
    if len(names) < 2:
        return
    logger.warning(
        "%s: --label %r gives all %d images one label, though they lie in %d sub-folders "
        "(%s), which label them without --label: leave it out to label each image by its "
        "folder",
        folder,
        label,
        len(images),
        len(names),
        first_few(names, 3),
    )


def warn_of_labels_apart_by_case(
    library: str | Path, given: Iterable[str], held: Iterable[str] = ()
) -> None:
    """Warn where a label `given` differs from another, given too or `held` by the
    `library`, only in case (`apple` beside `Apple`): most likely one product named two
    ways, which the library keeps, and recognition names, as two. (Both may be meant.)"""
    new = {normal_form(label) for label in given}
    spellings: defaultdict[str, set[str]] = defaultdict(set)
    for label in new | set(held):
        spellings[label.casefold()].add(label)
    apart = [sorted(names) for names in spellings.values() if len(names) > 1 and names & new]
    if apart:
        named = [f"{', '.join(map(repr, names[:-1]))} and {names[-1]!r}" for names in sorted(apart)]
        logger.warning(
            "labels that differ only in case are kept apart: %s; to make them one label, "
            "`shitu index relabel %s OLD NEW --merge`",
            first_few(named, 3),
            shlex.quote(str(library)),
        )


def _found(path: Path, resolve: bool) -> Path:
    """`path` resolved where `resolve` (see `collect_items`), else as found."""
    return path.resolve() if resolve else path


def gallery_libraries() -> dict[str, str]:
    """For `scan_images`: a gallery library in a folder of photos is skipped, or the images
    it keeps (those `shitu serve` adds, in its `uploads` folder) would be taken for photos
    of a label named after it. The CLI's commands skip these and exported models' folders.
    (Imported here: the metadata module imports this one.)"""
    from shitu.index.metadata import LIBRARY_FILE

    return {LIBRARY_FILE: "a gallery library"}


def _refuse_library(folder: Path) -> None:
    """A DataError for a gallery library given as a folder of images: a scan skips it (it
    holds features, not photos), which left only 'no images in its label sub-folders'."""
    if any((folder / name).is_file() for name in gallery_libraries()):
        raise DataError(
            f"{folder}: a gallery library, not a folder of gallery images; give the folders or "
            f"label files of the images it holds (`shitu index list {folder} --images` lists "
            "them)"
        )


def _one_label_hint(one_label_option: bool) -> str:
    """How else images get a label, for a caller that does or does not take --label."""
    if one_label_option:
        return (
            "or give them all one label with --label LABEL (`shitu index build` and "
            "`shitu index add`; label= in Python)"
        )
    return "or list them in a `path<TAB>label` file"


def _has_loose_images(folder: Path) -> bool:
    """Whether `folder` itself holds image files (False where it cannot be listed: the
    scan's warning has said so)."""
    try:
        return any(path.suffix.lower() in IMAGE_SUFFIXES for path in folder.iterdir())
    except OSError:
        return False


def _source_list(sources: object) -> list[str | os.PathLike]:
    """`sources` as a list of paths, one path alone a list of one; None, a number or an
    empty list is refused naming what to give, not failed inside pathlib (or, empty, as
    'no images listed in ' nothing)."""
    wanted = "label files, folders or images (paths or strings)"
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    listed = list(sources) if isinstance(sources, Iterable) else [sources]
    if not listed:
        raise DataError(f"no sources given: expected {wanted}")
    for source in listed:
        if not is_given_path(source):
            raise DataError(f"expected {wanted}, got {type(source).__name__} {source!r}")
        refuse_url(cast("str | os.PathLike", source), "images or label files")
    return cast("list[str | os.PathLike]", listed)  # each one checked by is_given_path


def collect_items(
    sources: Sequence[str | Path] | str | Path,
    label: str | None = None,
    one_label_option: bool = True,
    leaf_labels: bool = False,
    resolve: bool = True,
) -> list[GalleryItem]:
    """Items from any mix of label files, folders and image files (paths or strings; one
    path alone is a list of one).

    With `label`, every image (single files, whole folders) gets it; without, folders are
    read as folder-per-label trees (labelled by their first-level folders, or with
    `leaf_labels` by the folder each image is in) and label files carry their own labels.
    Errors about images without a label suggest --label where `one_label_option` (the
    caller takes it); those about `label` and `leaf_labels` name them as the CLI's flags
    and as these arguments.

    Paths are resolved (absolute, links followed), as a gallery stores them, to be found
    from any working directory; `resolve=False` keeps them as given (a folder's images as
    found in it, a label file's joined to its folder), for a command that only reads them
    and names them to the user as they gave them.
    """
    if label is not None and leaf_labels:
        raise DataError(
            "--label (label= in Python) gives every image one label, --leaf-labels "
            "(leaf_labels=True) takes them from folder names: give one or the other"
        )
    if label is not None:
        try:  # now, named as the option: after the scan, it was refused as the first image's
            label = check_label(label)
        except BadLabelError as exc:
            raise BadLabelError(f"--label (label= in Python): {exc}") from None
    paths = [Path(source) for source in _source_list(sources)]
    items: list[GalleryItem] = []
    for source in paths:
        if source.is_dir():
            _refuse_library(source)
            if label is None:
                items.extend(scan_label_folders(source, one_label_option, leaf_labels, resolve))
            else:
                images = scan_images(source, foreign=gallery_libraries())
                _warn_of_one_label_over_folders(source, images, label)
                items.extend(GalleryItem(_found(image, resolve), label) for image in images)
        elif source.is_file() and (
            source.suffix.lower() in IMAGE_SUFFIXES or holds_an_image(source)
        ):
            if label is None:
                how = (
                    "give it one with --label LABEL (`shitu index build` and `shitu index "
                    "add`; label= in Python), or list it in a `path<TAB>label` file"
                    if one_label_option
                    else "list it in a `path<TAB>label` file, or put it in a sub-folder "
                    "named after its label"
                )
                raise DataError(f"{source}: a single image needs a label: {how}")
            items.append(GalleryItem(_found(source, resolve), label))
        elif source.is_file():
            if label is not None:
                raise DataError(  # a label file, or no image at all (a .zip of photos)
                    f"{source}: --label (label= in Python) is for images and folders of "
                    "images, and this is neither (a label file carries its own labels)"
                )
            items.extend(parse_label_file(source, resolve))
        elif source.exists():  # a device or a FIFO, whose reading would never end
            kind = special_kind(source.stat())
            raise DataError(f"{source}: {kind}, not an image, folder or label file")
        else:
            raise DataError(f"{source}: no such file or folder")
    if not items:
        raise DataError(f"no images listed in {', '.join(map(str, paths))}")
    if leaf_labels and not any(source.is_dir() for source in paths):  # else dropped unseen
        logger.warning(
            "--leaf-labels (leaf_labels=True in Python) is not used: it labels the images of a "
            "folder by the folders they are in, and no folder was given (a label file carries "
            "its own labels)"
        )
    return items
