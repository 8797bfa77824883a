"""PaddleClas label-file datasets: one `relative/path label [unique_id]` per line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from shitu.data.datasets.base import (
    Entry,
    ImageDataset,
    TransformOps,
    check_root,
    read_lines,
    refuse_a_header,
)
from shitu.errors import DataError
from shitu.image_files import IMAGE_SUFFIXES
from shitu.registry import DATASETS, ConfigPath


@DATASETS.register("ImageNetDataset")
class LabelFileDataset(ImageDataset):
    """Images listed in a PaddleClas label file (names: ImageNetDataset, LabelFileDataset,
    VeriWild).

    Each non-blank line is `path label` or `path label unique_id`, split on
    `delimiter` (default: any run of whitespace; use a tab when paths or labels
    contain spaces, e.g. `img.jpg<TAB>Coca Cola 330ml`; `\\t` as YAML reads it unquoted,
    a backslash and a t, is a tab too). Paths are relative to `image_root`.

    Labels: when every label is an integer they are class ids (`relabel: true`
    maps the distinct values, sorted, to 0..C-1, kept in `label_map`); when none
    is, they are class names (in Unicode NFC, as a gallery library keeps labels),
    numbered in sorted order, with the names in `class_names`. A file that mixes the
    two is refused: a name among ids is most likely a mistake, and taking every label
    for a name would renumber the classes unseen (id 10 before id 2, as text sorts).
    Names and relabelled ids number only the labels this file lists, kept in
    `label_keys`: evaluation matches a query and a gallery file's classes through
    them, not by number. The optional third column is a unique id (e.g. a product or
    instance id; digits, a sign at most, as a class id) that retrieval evaluation uses
    to exclude an image's own entries;
    without it the entry's position among the listed images is used (from 0; blank
    lines and `#` comments are not counted). An image listed more than once is a sample
    each time, with a warning that names it (and its labels, where they differ).
    """

    def __init__(
        self,
        image_root: ConfigPath,
        cls_label_path: ConfigPath,
        transform_ops: TransformOps | None = None,
        delimiter: str | None = None,
        relabel: bool = False,
        skip_corrupt: bool = False,
    ):
        where = f"label file {cls_label_path}"
        super().__init__(transform_ops, skip_corrupt, where)
        self.image_root = image_root
        self.cls_label_path = cls_label_path
        self.relabel = relabel
        self.label_map: dict[int | str, int] | None = None
        # `delimiter: \t` unquoted (or -o '...delimiter=\t') is a backslash and a t, which
        # nothing is split on: the tab it means.
        if delimiter == "\\t":
            delimiter = "\t"
        self.check_params(delimiter=delimiter)
        check_root(image_root, where)
        split_on = None if delimiter == " " else delimiter  # None: any whitespace
        lines = read_lines(cls_label_path, "cls_label_path", image_root, split_on)
        if not lines:
            raise DataError(f"{where}: lists no images")
        refuse_a_header(cls_label_path, lines, image_root, split_on)
        rows = [self._split(number, line, delimiter) for number, line in lines]
        texts = dict(lines)
        if delimiter in (None, " "):
            self._refuse_spaced_paths(texts, image_root)

        with_ids = [len(fields) == 3 for _, fields in rows]
        if any(with_ids) and not all(with_ids):
            has, lacks = (rows[with_ids.index(flag)][0] for flag in (True, False))
            raise DataError(
                f"{cls_label_path}:{lacks}: no unique id, but line {has} has one; "
                "give the third column on every line or on none"
            )
        self.has_unique_ids = all(with_ids)
        labels = self._map_labels([(number, fields[1]) for number, fields in rows])

        entries = []
        for position, ((number, fields), label) in enumerate(zip(rows, labels, strict=True)):
            unique_id = position
            if self.has_unique_ids:
                # Digits only, as a class id: int() reads `4011_1` as 40111, another id.
                if not is_class_id(fields[2]):
                    hint = self._tab_hint(texts[number], delimiter, False)
                    raise DataError(
                        f"{cls_label_path}:{number}: unique id {fields[2]!r} is not an integer"
                        f"{hint}"
                    )
                unique_id = int(fields[2])
            path = os.path.join(image_root, fields[0])
            entries.append(Entry(path, label, unique_id, f"line {number}"))
        self._set_entries(entries, image_root)

    @staticmethod
    def check_params(delimiter: str | None = None, **_others: Any) -> None:
        """Also checked as a config loads (by the registry): an empty delimiter splits
        nothing (Python's split refuses it, naming no key)."""
        if delimiter == "":
            raise ValueError(
                'delimiter: empty; leave it out to split on whitespace, or give "\\t" for tabs'
            )

    def _split(self, number: int, line: str, delimiter: str | None) -> tuple[int, list[str]]:
        if delimiter is None or delimiter == " ":
            fields = line.split()
            if len(fields) > 1 and fields[0].endswith(","):
                # `img.jpg, 3, 1` splits into path `img.jpg,` and label `3,`: a class name
                raise DataError(
                    f"{self.cls_label_path}:{number}: the columns are separated by commas, got "
                    f"{line!r}; a Grocery Store listing ('path, fine_id, coarse_id') is read by "
                    "name: GroceryStoreDataset, another by delimiter: ','"
                )
            if len(fields) > 1 and Path(fields[1]).suffix.lower() in IMAGE_SUFFIXES:
                # `my photo.jpg 3` splits into path `my`, label `photo.jpg`: refused here,
                # not later as a missing file `my` or as a wrong label
                raise DataError(
                    f"{self.cls_label_path}:{number}: the label {fields[1]!r} looks like the "
                    f"end of an image path with a space in it, got {line!r}"
                    f"{self._tab_hint(line, delimiter, True)}"
                )
        else:
            fields = [field.strip() for field in line.split(delimiter)]
        if len(fields) not in (2, 3) or not all(fields):
            shown = "whitespace" if delimiter in (None, " ") else repr(delimiter)
            raise DataError(
                f"{self.cls_label_path}:{number}: expected 'path label [unique_id]' separated "
                f"by {shown}, got {line!r}{self._tab_hint(line, delimiter, len(fields) > 3)}"
            )
        return number, fields

    def _refuse_spaced_paths(self, texts: dict[int, str], image_root: str) -> None:
        """A whitespace split cuts `my photo 3` into path `my`, label `photo`, id `3`: when
        the first column is no file but a longer prefix of the line is, say so (instead of
        reporting `my` as missing, or skipping it under skip_corrupt)."""
        for number, line in texts.items():
            tokens = list(re.finditer(r"\S+", line))
            # a `path label` line has no longer path to try: it costs no file check here
            if len(tokens) < 3 or os.path.isfile(os.path.join(image_root, tokens[0].group())):
                continue
            for token in tokens[1:-1]:  # the path leaves at least a label after it
                candidate = line[: token.end()]
                if os.path.isfile(os.path.join(image_root, candidate)):
                    raise DataError(
                        f"{self.cls_label_path}:{number}: the image path {candidate!r} has a "
                        f"space in it, so whitespace splits it into columns, got {line!r}"
                        f"{self._tab_hint(line, None, True)}"
                    )

    @staticmethod
    def _tab_hint(line: str, delimiter: str | None, crowded: bool) -> str:
        """Advice for whitespace-split lines that look tab-separated or have spaces in a column."""
        if delimiter in (None, " ") and (crowded or "\t" in line):
            return (
                "; if paths or labels contain spaces, separate columns with tabs and set "
                'delimiter: "\\t"'
            )
        return ""

    def _map_labels(self, raw: list[tuple[int, str]]) -> list[int]:
        """Class ids for the raw label strings, in file order (see the class docstring)."""
        named = [(number, text) for number, text in raw if not is_class_id(text)]
        if named:
            if len(named) < len(raw):
                id_line, id_text = next(item for item in raw if is_class_id(item[1]))
                raise DataError(
                    f"{self.cls_label_path}:{named[0][0]}: label {named[0][1]!r} is a class "
                    f"name, but line {id_line} has the class id {id_text!r}; label every line "
                    "with an integer class id or every line with a class name (a name cannot "
                    "be a bare number)"
                )
            # As a gallery library compares labels (NFC): `Café` typed, and the same name
            # copied from a macOS folder listing, decomposed, were two classes, trained apart.
            # Imported here: the index package is not loaded for training otherwise.
            from shitu.index.labels import normal_form

            texts = [normal_form(text) for _, text in raw]
            self.class_names = sorted(set(texts))
            return self._number(self.class_names, texts)
        values = [int(text) for _, text in raw]
        if self.relabel:
            return self._number(sorted(set(values)), values)
        for (number, _), value in zip(raw, values, strict=True):
            if value < 0:
                raise DataError(
                    f"{self.cls_label_path}:{number}: label {value} is negative; "
                    "set relabel: true to renumber labels from 0"
                )
        # Labels index a classifier head, so it needs max + 1 outputs even if some are unused.
        self.num_classes = max(values) + 1
        return values

    def _number(self, keys: list[str] | list[int], labels: list[str] | list[int]) -> list[int]:
        """Ids 0..C-1 for the sorted distinct `keys`, kept in `label_keys` and `label_map`."""
        self.label_keys = keys
        self.label_map = {key: index for index, key in enumerate(keys)}
        self.num_classes = len(keys)
        return [self.label_map[label] for label in labels]


# A class id as PaddleClas's label files write one: ASCII digits, a sign allowed.
_CLASS_ID = re.compile(r"[+-]?[0-9]+")


def is_class_id(text: str) -> bool:
    """Whether `text` is a class id rather than a class name. Not whatever `int` reads:
    it takes `4011_1` (a product code and its variety) for the id 40111, and so would
    number each such name as a class of a classifier tens of thousands wide."""
    return _CLASS_ID.fullmatch(text) is not None


DATASETS.register("LabelFileDataset")(LabelFileDataset)
# PaddleClas's name for the same listing with a third column (there a camera id, which the
# vehicle re-identification protocol excludes as this does a unique id), so that its
# configs load as they are.
DATASETS.register("VeriWild")(LabelFileDataset)
