"""The Grocery Store dataset (Klasson et al.): `path, fine_id, coarse_id` per line."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Literal

from shitu.data.datasets.base import (
    Entry,
    ImageDataset,
    TransformOps,
    check_root,
    read_lines,
    refuse_a_header,
)
from shitu.data.datasets.label_file import is_class_id
from shitu.errors import ConfigError, DataError
from shitu.fileio import SAVE_AS_UTF8, read_listing_text
from shitu.image_files import IMAGE_SUFFIXES
from shitu.registry import DATASETS, ConfigPath

ICONIC = "iconic"  # a cls_label_path value: the one packshot per class named in classes.csv


@DATASETS.register("GroceryStoreDataset")
class GroceryStoreDataset(ImageDataset):
    """Grocery Store listing (`train.txt`, `val.txt`, `test.txt`) with `classes.csv` names.

    `label_level` picks the fine classes (81 products and varieties) or the coarse
    ones (43, e.g. all apples). Paths are relative to `image_root`, the dataset's
    folder; `class_file` defaults to `classes.csv` there (names are None without it).
    `cls_label_path` may list several files (e.g. train and val for a final run); their
    images are joined in order. The value `iconic` stands for the dataset's packshot
    split: the one web "iconic" image per class that `classes.csv` names, a gallery
    with no real photos in it.
    """

    def __init__(
        self,
        image_root: ConfigPath,
        cls_label_path: ConfigPath | list[ConfigPath],
        transform_ops: TransformOps | None = None,
        label_level: Literal["fine", "coarse"] = "fine",
        class_file: ConfigPath | None = None,
        skip_corrupt: bool = False,
    ):
        # One listing or several; paths as text (a Path, as the other datasets take one).
        single = isinstance(cls_label_path, str | os.PathLike)
        listings = [os.fspath(p) for p in ([cls_label_path] if single else cls_label_path)]
        if not listings:
            raise DataError("cls_label_path names no label file")
        where = f"label file {' + '.join(listings)}"
        # Refused as the registry refuses it in a config: anything but "fine" ("Fine", say)
        # was taken for "coarse".
        if label_level not in ("fine", "coarse"):
            raise ConfigError(f"label_level: expected 'fine' or 'coarse', got {label_level!r}")
        super().__init__(transform_ops, skip_corrupt, where)
        self.image_root = image_root
        check_root(image_root, where)
        column = 1 if label_level == "fine" else 2
        if class_file is None and (Path(image_root) / "classes.csv").is_file():
            class_file = str(Path(image_root) / "classes.csv")
        entries: list[Entry] = []
        for listing in listings:  # e.g. [train.txt, val.txt] for a final train+val run
            if listing == ICONIC:
                if class_file is None:
                    raise DataError(
                        f"{where}: 'iconic' lists the packshots named in classes.csv, "
                        f"which {image_root} does not have (set class_file)"
                    )
                file, lines = class_file, read_iconic_listing(class_file)
            else:
                file, lines = listing, read_lines(listing, "cls_label_path", image_root, ",")
                refuse_a_header(listing, lines, image_root, ",")
            for number, line in lines:
                relative, label = _parse_line(file, number, line, column)
                path = os.path.join(image_root, relative)
                source = f"{Path(file).name} line {number}"
                entries.append(Entry(path, label, len(entries), source))

        if class_file is not None:
            self.class_names = read_class_names(class_file, label_level)
        largest = max((entry.label for entry in entries), default=-1)
        if self.class_names is not None and largest >= len(self.class_names):
            raise DataError(
                f"{where}: class id {largest} but {class_file} names only "
                f"{len(self.class_names)} {label_level} classes"
            )
        self.num_classes = len(self.class_names) if self.class_names else largest + 1
        self._set_entries(entries, image_root)


def _parse_line(listing: str, number: int, line: str, column: int) -> tuple[str, int]:
    """(image path relative to the root, class id from `column`) of one listing line."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != 3 or not all(fields):
        # A copied Grocery config pointed at the user's own list, in PaddleClas's format.
        paddle = len(fields) == 1 and len(line.split()) in (2, 3)
        hint = (
            "; a 'path label' file is an ImageNetDataset's (name: ImageNetDataset)"
            if paddle
            else ""
        )
        raise DataError(
            f"{listing}:{number}: expected 'path, fine_id, coarse_id', got {line!r}{hint}"
        )
    # Digits only (is_class_id): int() reads `4_0` as the class 40, `３` as 3.
    if not is_class_id(fields[column]):
        raise DataError(f"{listing}:{number}: class id {fields[column]!r} is not an integer")
    label = int(fields[column])
    if label < 0:
        raise DataError(f"{listing}:{number}: class id {label} is negative")
    return fields[0], label


def _read_class_rows(path: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the rows of `classes.csv`, below its header if it has one.
    Read as label files are (`read_text`): UTF-16 too, as Excel saves "Unicode Text", and
    refused in the same words, not Python's ("[Errno 2] ...", "'utf-8' codec can't decode
    byte ...")."""
    try:
        text = read_listing_text(path, f"class file {path}")
    except UnicodeDecodeError:
        raise DataError(f"class file {path} is not UTF-8 or UTF-16 text: {SAVE_AS_UTF8}") from None
    rows = list(enumerate(csv.reader(io.StringIO(text, newline="")), 1))
    # The header, which the dataset's own file has: a first row whose class id is a number
    # is a class's (one saved without the header lost its first class, and the id check
    # then said only that the ids are not 0..N-1).
    if rows and not (len(rows[0][1]) > 1 and rows[0][1][1].strip().isdigit()):
        rows = rows[1:]
    rows = [(number, row) for number, row in rows if row]
    # A listing given as the class table (`class_file: val.txt`) was refused by its second
    # row, 'class id 0 named both .../001.jpg and .../002.jpg': a class name is no image.
    if rows and Path(rows[0][1][0].strip()).suffix.lower() in IMAGE_SUFFIXES:
        number, row = rows[0]
        raise DataError(
            f"{path}:{number}: a listing of images ('path, fine_id, coarse_id'), not a table "
            f"of class names and ids (the Grocery Store dataset's classes.csv): its first "
            f"column {row[0].strip()!r} is an image, not a class name"
        )
    return rows


def read_iconic_listing(path: str) -> list[tuple[int, str]]:
    """`classes.csv`'s iconic images as listing lines: (line number, 'path, fine, coarse')."""
    lines = []
    for number, row in _read_class_rows(path):
        if len(row) < 5 or not row[4].strip():
            raise DataError(f"{path}:{number}: no iconic image path (5th column) in {row}")
        lines.append((number, f"{row[4].strip().lstrip('/')}, {row[1]}, {row[3]}"))
    return lines


def read_class_names(path: str, level: Literal["fine", "coarse"]) -> list[str]:
    """Names by class id from `classes.csv` (columns: name, id, coarse name, coarse id, ...)."""
    name_col, id_col = (0, 1) if level == "fine" else (2, 3)
    names: dict[int, str] = {}
    for number, row in _read_class_rows(path):
        if len(row) <= id_col or not is_class_id(row[id_col].strip()):
            raise DataError(
                f"{path}:{number}: expected 'name, id, coarse name, coarse id, ...', got {row}"
            )
        class_id, name = int(row[id_col]), row[name_col].strip()
        if names.get(class_id, name) != name:
            raise DataError(
                f"{path}:{number}: class id {class_id} named both {names[class_id]!r} and {name!r}"
            )
        names[class_id] = name
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: {level} class ids are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]
