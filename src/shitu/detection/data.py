"""Detection datasets (COCO JSON, Pascal VOC XML), box-aware augmentations and batching.

Samples are `(image, boxes, labels)`: a PIL RGB image, float32 [K, 4] boxes (x1, y1, x2, y2)
in its pixels and int64 [K] class ids. COCO's crowd regions are kept apart (`crowds`), for
evaluation to ignore the detections in them; Pascal VOC's `difficult` boxes are trained on, as
PaddleDetection trains on them, and marked (`difficult`) for evaluation to ignore.
Augmentations draw from Python's `random`, so the engine's per-sample seeding
(`shitu.engine.seeding.SeededDataset`) makes them reproducible.
Batches are resized to one square size (chosen per batch: multi-scale training) without
keeping the aspect ratio, as PicoDet trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Hashable, Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch
from PIL import Image, ImageEnhance

from shitu.data.transforms.ops import UnreadableImageError, decode_rgb_image
from shitu.detection.detector import preprocess
from shitu.errors import DataError, first_few
from shitu.fileio import (
    from_working_directory,
    listed_file,
    read_regular_file,
    read_text,
    special_kind,
    text_lines,
)
from shitu.image_files import read_image_file, undecodable_text_reason

logger = logging.getLogger(__name__)

Sample = tuple[Image.Image, np.ndarray, np.ndarray]
FOREGROUND = ("foreground",)
_Value = TypeVar("_Value")
_SHOW = 5  # missing images named in an error message before the rest are counted


class DetectionDataset:
    """Images + boxes held as lists; subclasses only parse their annotation format."""

    def __init__(
        self,
        images: list[Path],
        boxes: list[np.ndarray],
        labels: list[np.ndarray],
        class_names: tuple[str, ...],
        class_agnostic: bool,
        transform: Callable[[Sample], Sample] | None,
        crowds: list[tuple[np.ndarray, np.ndarray]] | None = None,
        source: str | Path = "the detection dataset",
        difficult: list[np.ndarray] | None = None,
        sizes: list[tuple[float, float] | None] | None = None,
    ) -> None:
        """`crowds`: each image's crowd regions (boxes, labels), none where not given.
        `source`: the annotations' file or folder, which the errors name (a run reads a
        training and a validation set). `difficult`: each image's [K] mask of the boxes
        evaluation ignores (VOC's `difficult`), none where not given. `sizes`: each
        image's (width, height) as the annotations record it, None where they do not."""
        if not images:
            raise DataError(f"{source}: lists no images")
        if not class_names:
            raise DataError(f"{source}: names no classes (no categories)")
        _check_listed_files_exist(images, source, "images")
        no_crowd = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        crowds = crowds if crowds is not None else [no_crowd] * len(images)
        if class_agnostic:
            labels = [np.zeros_like(lab) for lab in labels]
            crowds = [(box, np.zeros_like(lab)) for box, lab in crowds]
            class_names = FOREGROUND
        self.images, self.boxes, self.labels = images, boxes, labels
        self.crowds = crowds
        self.difficult = (
            difficult if difficult is not None else [np.zeros(len(lab), bool) for lab in labels]
        )
        self.class_names = class_names
        self.transform = transform
        self.source = source
        self.recorded_sizes = sizes if sizes is not None else [None] * len(images)
        self._named: set[str] = set()  # each warning of `_check_boxes_fit` once per process

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def listing_digest(self) -> str:
        """A digest of the images' file names, boxes and labels, in order: what a resumed
        run must find again to draw the batches it would have. File names rather than
        paths, so that the same data moved to another folder is still the same. Computed
        once: every checkpoint records it."""
        digest = hashlib.sha256()
        for image, boxes, labels in zip(self.images, self.boxes, self.labels, strict=True):
            digest.update(Path(image).name.encode() + b"\0")
            digest.update(np.asarray(boxes, np.float32).tobytes())
            digest.update(np.asarray(labels, np.int64).tobytes() + b"\0")
        return digest.hexdigest()

    def load_image(self, index: int) -> Image.Image:
        """Decoded as the recogniser's training decodes (EXIF orientation applied, so the
        boxes, annotated on the photo as displayed, fall where they belong)."""
        path = self.images[index]
        try:
            image = decode_rgb_image(_read(path, "image", read_image_file))
        except UnreadableImageError as exc:
            raise DataError(f"{path}: {exc}") from None
        self._check_boxes_fit(index, image.size)
        return image

    def _check_boxes_fit(self, index: int, size: tuple[int, int]) -> None:
        """Warn (once per process) of the first image whose pixels, read upright, are not
        the size its annotations record, and, where they record none, of the first with
        boxes wholly outside it (those outside a recorded size are counted as the
        annotations load). Such boxes were drawn on another size of the photo (a resized
        copy; a phone photo annotated sideways, before the EXIF orientation reading applies)
        and would be trained on, and evaluated at, other places of it, or dropped, without
        a word."""
        recorded = self.recorded_sizes[index]
        if recorded is None:
            boxes = self.boxes[index]
            inside = len(clip_boxes(boxes, self.labels[index], *size)[0])
            if inside < len(boxes) and self._first("outside"):
                logger.warning(
                    "%s: %d of its %d boxes lie wholly outside it (%dx%d pixels, read upright) "
                    "and are left out; were they drawn on another size of it? (later images "
                    "with such boxes are not named)",
                    self.images[index],
                    len(boxes) - inside,
                    len(boxes),
                    *size,
                )
            return
        if tuple(recorded) == size or not self._first("size"):
            return
        width, height = recorded
        sideways = (
            " (width and height swapped: were its boxes drawn on the photo sideways, before "
            "its EXIF orientation turns it upright as it is read here?)"
            if (height, width) == size
            else ""
        )
        logger.warning(
            "%s: read upright it is %dx%d pixels, but %s records %gx%g for it%s; its boxes "
            "were clipped to the size recorded, and where drawn on a copy of that size they "
            "fall elsewhere on these pixels (later images whose size differs are not named)",
            self.images[index],
            *size,
            self.annotations_of(index),
            width,
            height,
            sideways,
        )

    def annotations_of(self, index: int) -> str | Path:
        """The annotation file (or folder) that describes image `index`, as warnings name it."""
        return self.source

    def _first(self, warning: str) -> bool:
        """Whether `warning` is given for the first time (by this process)."""
        first = warning not in self._named
        self._named.add(warning)
        return first

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.boxes[index], self.labels[index]

    def use_class_order(self, class_names: Sequence[str]) -> None:
        """Renumber the labels to follow `class_names` (a model's classes, of which these
        may be a subset, in another order), so that class ids mean the same on both sides."""
        unknown = sorted(set(self.class_names) - set(class_names))
        if unknown:
            raise DataError(f"the classes {unknown} are not among the model's {list(class_names)}")
        new_id = np.array([list(class_names).index(name) for name in self.class_names], np.int64)
        self.labels = [new_id[labels] for labels in self.labels]
        self.crowds = [(boxes, new_id[labels]) for boxes, labels in self.crowds]
        self.class_names = tuple(class_names)

    def __getitem__(self, index: int) -> Sample:
        image = self.load_image(index)
        boxes, labels = clip_boxes(self.boxes[index], self.labels[index], *image.size)
        sample = (image, boxes, labels)
        return self.transform(sample) if self.transform else sample


def _check_listed_files_exist(files: list[Path], source: str | Path, what: str) -> None:
    """At start-up, not when training (or, for a validation set, evaluation after it) first
    reads a missing image: a wrong image folder is named before hours of work are lost. A
    VOC list's annotation files too, which are found from the image folder as well."""
    missing = [path for path in files if not path.exists()]
    if missing:
        raise DataError(
            f"{source}: {len(missing)} of the {len(files)} {what} it lists do not exist: "
            f"{first_few(missing, _SHOW)} (is the image folder right?)"
        )
    # There, but a folder, a device or a FIFO: not said not to exist, each named as what it is
    others = [
        f"{path} ({'a folder' if path.is_dir() else special_kind(path.stat())})"
        for path in files
        if not path.is_file()
    ]
    if others:
        raise DataError(
            f"{source}: {len(others)} of the {len(files)} {what} it lists are no files: "
            f"{first_few(others, _SHOW)}"
        )


def clip_boxes(
    boxes: np.ndarray, labels: np.ndarray, width: float, height: float
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to the image, those left with no area dropped (as PaddleDetection's
    loaders do): an annotation that runs past the border would otherwise never match a
    prediction, which is clipped to the image."""
    clipped = boxes.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], labels[keep].copy()


def _box_arrays(rows: list[tuple[list[float], int]]) -> tuple[np.ndarray, np.ndarray]:
    """One image's (box, class id) rows as boxes [K, 4] float32 and labels [K] int64."""
    boxes = np.array([box for box, _ in rows], np.float32).reshape(-1, 4)
    return boxes, np.array([label for _, label in rows], np.int64)


def _without_empty_boxes(
    source: str | Path, boxes: list[np.ndarray], labels: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Boxes with no area (x2 <= x1 or y2 <= y1) left out and counted in a warning, as
    PaddleDetection's loaders warn of each: a tool that swapped the corners would otherwise
    lose every box of a file unnoticed."""
    keep = [(box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]) for box in boxes]
    empty = sum(int((~kept).sum()) for kept in keep)
    if empty:
        logger.warning(
            "%s: %d of the %d boxes have no area (x2 <= x1 or y2 <= y1: a point, a line or "
            "swapped corners) and are left out",
            source,
            empty,
            sum(map(len, boxes)),
        )
    return (
        [box[kept] for box, kept in zip(boxes, keep, strict=True)],
        [label[kept] for label, kept in zip(labels, keep, strict=True)],
    )


def _clip_to_recorded_sizes(
    source: str | Path,
    boxes: list[np.ndarray],
    labels: list[np.ndarray],
    sizes: list[tuple[float, float] | None],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each image's boxes clipped to its size where the annotations record it (None: not
    recorded; clipped when the image is read). Boxes left with no area, wholly outside their
    image, are counted in a warning rather than dropped unnoticed: they were most likely
    drawn on other pixels (a resized copy of the image, say)."""
    clipped = [
        (box, label) if size is None else clip_boxes(box, label, *size)
        for box, label, size in zip(boxes, labels, sizes, strict=True)
    ]
    total, kept = sum(map(len, boxes)), sum(len(box) for box, _ in clipped)
    if kept < total:
        logger.warning(
            "%s: %d of the %d boxes lie wholly outside their image (its recorded width and "
            "height) and are left out; were they drawn on another size of the images?",
            source,
            total - kept,
            total,
        )
    return [box for box, _ in clipped], [label for _, label in clipped]


def _read_text_file(path: Path) -> bytes:
    """An annotation file's bytes (COCO JSON, VOC XML): text, so no device or FIFO."""
    return read_regular_file(path, "a text file")


def _read(path: Path, what: str, read: Callable[[Path], bytes] = _read_text_file) -> bytes:
    """The bytes of the `what` ("image", "COCO annotation file") at `path`, by `read`: only
    where it is a regular file (`read_regular_file`; an image within the size limit of
    `read_image_file`), as `path.read_bytes()` read /dev/zero until memory ran out and
    waited on a FIFO for a writer without end."""
    try:
        return read(path)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


class CocoDetection(DetectionDataset):
    """COCO `instances_*.json`: category ids become 0..C-1 in id order; crowd boxes are not
    trained on, but kept as `crowds` for evaluation."""

    def __init__(
        self,
        annotation_file: str | Path,
        image_root: str | Path,
        class_agnostic: bool = False,
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        path = Path(annotation_file)
        try:
            data = json.loads(_read(path, "COCO annotation file"))
            if not isinstance(data, dict):  # a results file's list of detections, say
                raise ValueError(
                    f"a JSON {type(data).__name__}, not an object of images, annotations and "
                    "categories"
                )
            categories = sorted(_checked_entries(data, "categories"), key=lambda c: c["id"])
            _refuse_repeated_ids("category", [c["id"] for c in categories])
            _check_category_names(categories)
            cat_index = {c["id"]: i for i, c in enumerate(categories)}
            images = _checked_entries(data, "images")
            image_ids = [img["id"] for img in images]
            _refuse_repeated_ids("image", image_ids)
            root = Path(image_root)
            files = {img["id"]: listed_file(root, img["file_name"]) for img in images}
            _refuse_repeated_files(images, files)
            sizes = [_recorded_size(img) for img in images]
            per_image: dict[int, list[tuple[list[float], int, bool]]] = {i: [] for i in image_ids}
            names = {img["id"]: img["file_name"] for img in images}
            for position, ann in enumerate(_objects(data, "annotations")):
                name = _annotation_name(position, ann, names)
                if "bbox" not in ann:  # a bare "no 'bbox' key" left the user to search
                    raise ValueError(f"{name}: no 'bbox' key")
                bbox = ann["bbox"]
                four = isinstance(bbox, list) and len(bbox) == 4
                # strings ("10") were read as numbers, hiding a converter that wrote them
                if not four or any(
                    isinstance(v, bool) or not isinstance(v, int | float) for v in bbox
                ):
                    raise ValueError(f"{name}: its bbox {bbox!r} is not [x, y, w, h] of numbers")
                x, y, w, h = (float(v) for v in bbox)
                if not math.isfinite(x + y + w + h):  # NaN would fail every test below, unnoticed
                    raise ValueError(f"{name}: its bbox {bbox!r} is not finite")
                for key, what, known in (
                    ("image_id", "image", per_image),
                    ("category_id", "category", cat_index),
                ):
                    # named, not a bare KeyError(42) or "unhashable type: 'list'"
                    if isinstance(ann[key], list | dict) or ann[key] not in known:
                        raise ValueError(f"{name}: no {what} has its {key} {ann[key]!r}")
                crowd = ann.get("iscrowd")
                if crowd not in (None, 0, 1):  # "0", a string, would make every box a crowd
                    raise ValueError(f"{name}: its iscrowd {crowd!r} is not 0 or 1")
                per_image[ann["image_id"]].append(
                    ([x, y, x + w, y + h], cat_index[ann["category_id"]], bool(crowd))
                )
        except KeyError as exc:
            raise DataError(f"{path} is not a valid COCO annotation file (no {exc} key)") from None
        except UnicodeDecodeError:  # its codec's words named a byte, not the file's fault
            reason = undecodable_text_reason(path, "JSON text")
            raise DataError(f"{path} is not a valid COCO annotation file ({reason})") from None
        except (ValueError, TypeError) as exc:
            raise DataError(f"{path} is not a valid COCO annotation file ({exc})") from None
        boxes, labels, crowds = [], [], []
        for image in data["images"]:
            objects = [(box, c) for box, c, crowd in per_image[image["id"]] if not crowd]
            regions = [(box, c) for box, c, crowd in per_image[image["id"]] if crowd]
            image_boxes, image_labels = _box_arrays(objects)
            boxes.append(image_boxes)
            labels.append(image_labels)
            crowds.append(_box_arrays(regions))
        boxes, labels = _without_empty_boxes(path, boxes, labels)
        boxes, labels = _clip_to_recorded_sizes(path, boxes, labels, sizes)
        super().__init__(
            [files[i] for i in image_ids],
            boxes,
            labels,
            tuple(c["name"] for c in categories),
            class_agnostic,
            transform,
            crowds,
            path,
            sizes=sizes,
        )


def _objects(data: dict, key: str) -> list[dict]:
    """`data[key]`, a COCO file's list of objects; a ValueError naming it where it is no
    list, or an entry that is no object (a converter's output gone wrong): they failed with
    Python's words, "'int' object is not subscriptable", or were read as no images."""
    entries = data[key]
    if not isinstance(entries, list):
        kind = type(entries).__name__
        kind = {"dict": "object", "str": "string", "NoneType": "null"}.get(kind, kind)
        raise ValueError(f"its {key!r} is a JSON {kind}, not a list")
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{key}[{position}] is {entry!r}, not an object")
    return entries


def _checked_entries(data: dict, key: str) -> list[dict]:
    """The images or categories of a COCO file (`_objects`), each id a number or text, of
    one kind (the categories are sorted by id), and each image's file_name text: others
    failed with Python's words ("unhashable type: 'list'", "'<' not supported between
    instances of 'str' and 'int'")."""
    entries = _objects(data, key)
    for position, entry in enumerate(entries):
        given = entry["id"]
        if isinstance(given, bool) or not isinstance(given, int | str):
            raise ValueError(f"{key}[{position}]: its id {given!r} is not a number or text")
        if key == "images" and not isinstance(entry["file_name"], str):
            raise ValueError(f"{key}[{position}]: its file_name {entry['file_name']!r} is not text")
    kinds = {type(entry["id"]) for entry in entries}
    if len(kinds) > 1:
        mixed = [next(e["id"] for e in entries if type(e["id"]) is kind) for kind in (int, str)]
        raise ValueError(f"the {key}' ids mix numbers and text ({mixed[0]!r}, {mixed[1]!r})")
    return entries


def _annotation_name(position: int, ann: dict, file_names: dict) -> str:
    """How an error names a COCO annotation: its place in the list and its id (which a
    hand-made file may leave out or repeat), and its image's id and file, to find it by."""
    image_id = ann.get("image_id")
    known = not isinstance(image_id, list | dict) and image_id in file_names
    file = f": {file_names[image_id]}" if known else ""
    return f"annotations[{position}] (id {ann.get('id')!r}, image {image_id!r}{file})"


def _recorded_size(image: dict) -> tuple[float, float] | None:
    """A COCO image's (width, height), numbers or numeric strings; None where it records
    none (they are optional) or one that is not positive, as a VOC file's <size>: its boxes
    are clipped to the image when it is read instead."""
    try:
        width, height = (float(image.get(key) or 0) for key in ("width", "height"))
    except (TypeError, ValueError):
        raise ValueError(
            f"image {image.get('id')!r}: its width {image.get('width')!r} and height "
            f"{image.get('height')!r} are not both numbers"
        ) from None
    return (width, height) if width > 0 and height > 0 else None


def _refuse_repeated_ids(what: str, ids: list) -> None:
    """A ValueError for an id listed twice: annotations name images and categories by id, so
    the boxes of one image would land on the other's file (or one class's on another's)."""
    clash = _first_clash((item_id, position) for position, item_id in enumerate(ids))
    if clash:
        raise ValueError(f"two {what}s have the id {clash[0]!r}; ids must be unique")


def _refuse_repeated_files(images: list[dict], files: dict) -> None:
    """A ValueError for two image entries of one file (COCO files merged, say): each would
    be trained on with only its own boxes, the other's objects taught as background, and
    evaluated so, a detection of those counted as wrong."""
    clash = _first_clash((files[image["id"]], image) for image in images)
    if clash:
        _, first, second = clash
        raise ValueError(
            f"the images {first['id']!r} and {second['id']!r} are both the file "
            f"{second['file_name']!r}; list each photo once, with all its boxes"
        )


def _first_clash(
    pairs: Iterable[tuple[Hashable, _Value]],
) -> tuple[Hashable, _Value, _Value] | None:
    """The first key paired with a value other than its first one, as (key, first value,
    that value); None where every key keeps one value. The one check behind each "listed
    twice" refusal of the annotation formats (an id, an image's file, its annotation file,
    a category's name), each of which words its own message."""
    first: dict[Hashable, _Value] = {}
    for key, value in pairs:
        if first.setdefault(key, value) != value:
            return key, first[key], value
    return None


def _check_category_names(categories: list[dict]) -> None:
    """A ValueError for a category name that is not text, or is empty, and for two
    categories of one name: classes are known by name (the model's class names, a validation
    set's classes matched to them), so the second would silently be taken for the first."""
    for category in categories:
        name = category["name"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"category {category['id']!r}: its name {name!r} is not a name")
    clash = _first_clash((category["name"], category["id"]) for category in categories)
    if clash:
        name, first_id, second_id = clash
        raise ValueError(
            f"the categories {first_id!r} and {second_id!r} are both named {name!r}; "
            "category names must be unique (merge them, or rename one)"
        )


class VocDetection(DetectionDataset):
    """Pascal VOC: one XML per image in `annotation_dir`, images in `image_dir` by <filename>;
    or `annotation_dir` a list file of `image xml` lines, both paths relative to
    `image_dir` (PaddleDetection's `trainval.txt` and `test.txt`: the splits of one
    Annotations folder), each line's image taken as given.

    Class ids follow `class_names` (default: the sorted names found); `difficult` boxes
    are trained on, as PaddleDetection trains on them, and marked in `difficult` for the
    evaluation to ignore, as VOC's protocol does.
    """

    def __init__(
        self,
        annotation_dir: str | Path,
        image_dir: str | Path,
        class_names: Sequence[str] | None = None,
        class_agnostic: bool = False,
        transform: Callable[[Sample], Sample] | None = None,
    ) -> None:
        given = list(class_names or ())
        repeated = sorted({n for n in given if given.count(n) > 1})
        if repeated:  # the boxes of each would all be given the last one's id
            raise DataError(f"class_names: {repeated} are listed more than once")
        if not Path(annotation_dir).exists():  # a mistyped list, not a folder without XML
            raise DataError(
                f"VOC annotations {annotation_dir}: no such folder or list file"
                f"{from_working_directory(annotation_dir)}"
            )
        listed: Sequence[tuple[Path | None, Path]]  # (image, XML); None: the XML names it
        if Path(annotation_dir).is_file():
            listed = _voc_list(Path(annotation_dir), Path(image_dir))
        elif not Path(annotation_dir).is_dir():  # a device, a FIFO: was NotADirectoryError
            kind = special_kind(Path(annotation_dir).stat())
            raise DataError(f"VOC annotations {annotation_dir}: {kind}, not a folder or list file")
        else:
            listed = [(None, xml) for xml in _xml_files(Path(annotation_dir))]
            if not listed:
                raise DataError(f"no VOC annotation files (*.xml) in {annotation_dir}")
        xml_files = [xml for _, xml in listed]
        parsed = [self._parse(path, image is None) for image, path in listed]
        names = tuple(class_names or sorted({n for _, objs, _ in parsed for n, _, _ in objs}))
        if not names:  # said in VOC's terms, not as the base class's COCO "categories"
            raise DataError(
                f"{annotation_dir}: none of its {len(listed)} annotation files has an <object>, "
                "so there are no classes"
            )
        index = {name: i for i, name in enumerate(names)}
        boxes, positions, class_ids, hard = [], [], [], []
        for path, (_, objects, _) in zip(xml_files, parsed, strict=True):
            unknown = {n for n, _, _ in objects} - set(index)
            if unknown:
                raise DataError(f"{path}: classes {sorted(unknown)} are not in class_names")
            # Each box's position in its file goes through the filters below in place of its
            # label, so that its class and difficult flag follow the boxes they keep.
            image_boxes, image_positions = _box_arrays(
                [(b, i) for i, (_, b, _) in enumerate(objects)]
            )
            boxes.append(image_boxes)
            positions.append(image_positions)
            class_ids.append(np.array([index[n] for n, _, _ in objects], np.int64))
            hard.append(np.array([d for _, _, d in objects], bool))
        sizes = [size for _, _, size in parsed]
        boxes, positions = _without_empty_boxes(annotation_dir, boxes, positions)
        boxes, positions = _clip_to_recorded_sizes(annotation_dir, boxes, positions, sizes)
        labels = [ids[kept] for ids, kept in zip(class_ids, positions, strict=True)]
        difficult = [flags[kept] for flags, kept in zip(hard, positions, strict=True)]
        images = [
            image or listed_file(Path(image_dir), filename)
            for (image, _), (filename, _, _) in zip(listed, parsed, strict=True)
        ]
        _refuse_images_of_two_files(images, xml_files)
        super().__init__(
            images,
            boxes,
            labels,
            names,
            class_agnostic,
            transform,
            source=annotation_dir,
            difficult=difficult,
            sizes=sizes,
        )
        self.xml_files = xml_files

    def annotations_of(self, index: int) -> str | Path:
        """The XML file that annotates image `index`."""
        return self.xml_files[index]

    @staticmethod
    def _parse(
        path: Path, needs_filename: bool = True
    ) -> tuple[str, list[tuple[str, list[float], bool]], tuple[float, float] | None]:
        """(file name, [(class name, box, difficult)], (width, height) if the XML records it);
        `needs_filename`: the image is found by its <filename> (not given by a list)."""
        try:
            root = ET.fromstring(_read(path, "VOC annotation file"))
            # Pretty-printed files (an editor's, a script's) put the name on a line of its own
            filename = (root.findtext("filename") or "").strip()
            if needs_filename and not filename:
                raise ValueError("no <filename>")
            objects = []
            for number, obj in enumerate(root.iter("object"), 1):
                name = (obj.findtext("name") or "").strip()
                corners = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
                if not name or None in corners:  # said so, not as Python's NoneType errors
                    raise ValueError(
                        f"object {number} needs a <name> and a <bndbox> with <xmin>, <ymin>, "
                        "<xmax> and <ymax>"
                    )
                difficult = (obj.findtext("difficult") or "0").strip()
                if difficult not in ("0", "1"):  # read as 1 by one tool and 0 by another
                    raise ValueError(f"object {number}: <difficult> is 0 or 1, not {difficult!r}")
                box = [
                    _number(value, f"object {number}'s <{tag}>")
                    # none of `corners` is None: checked above
                    for tag, value in zip(
                        ("xmin", "ymin", "xmax", "ymax"), cast("list[str]", corners), strict=True
                    )
                ]
                if not math.isfinite(sum(box)):  # NaN: "no area"; inf: a box that never matches
                    raise ValueError(f"object {number}: its <bndbox> {box} is not finite")
                objects.append((name, box, difficult == "1"))
            width, height = (
                _number(root.findtext(f"size/{k}") or "0", f"<size>'s <{k}>")
                for k in ("width", "height")
            )
        except (ET.ParseError, ValueError, TypeError) as exc:
            raise DataError(f"{path} is not a valid VOC annotation file ({exc})") from None
        return filename, objects, (width, height) if width > 0 and height > 0 else None


def _number(text: str, what: str) -> float:
    """A VOC file's number, or a ValueError naming its tag and object: Python's own
    "could not convert string to float: 'a'" left a file of a hundred boxes to search."""
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {text.strip()!r} is not a number") from None


def _xml_files(folder: Path) -> list[Path]:
    """The XML files in `folder`, by name, whatever the case of their extension: a tool or
    a copy from Windows names them `IMG_1.XML`, which `*.xml` left out on Linux."""
    return sorted(path for path in folder.iterdir() if path.suffix.lower() == ".xml")


def _refuse_images_of_two_files(images: list[Path], xml_files: list[Path]) -> None:
    """A DataError for an image that two annotation files describe (a copy of an XML file
    left beside it, say): each would be trained on with only its own boxes, the other's
    objects taught as background. A list line repeated, the same image and file twice,
    stays: that only shows the image more often."""
    clash = _first_clash(zip(images, xml_files, strict=True))
    if clash:
        image, first_xml, second_xml = clash
        raise DataError(
            f"{first_xml} and {second_xml} both annotate the image {image}; give each image "
            "one annotation file, with all its boxes"
        )


def _voc_list(path: Path, root: Path) -> list[tuple[Path, Path]]:
    """(image, XML) of each `image xml` line of a PaddleDetection VOC list, relative to
    `root`; blank lines and `#` comments left out."""
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read VOC list {path}: {exc}") from None
    pairs = []
    for number, line in enumerate(text_lines(text), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise DataError(
                f"{path}:{number}: expected 'image xml' (PaddleDetection's VOC list: two paths "
                f"relative to the image folder), got {line.strip()!r}"
            )
        pairs.append((listed_file(root, fields[0]), listed_file(root, fields[1])))
    if not pairs:
        raise DataError(f"{path}: lists no images")
    # all named at once, as the images are, not the first alone as a file that cannot be read
    _check_listed_files_exist([xml for _, xml in pairs], path, "annotation files")
    return pairs


def random_crop(sample: Sample) -> Sample:
    """Crop a random window, each side at least 0.3 of the image's, that keeps every box
    whose centre it contains (clipped to it); 20 windows that keep none leave it uncropped."""
    image, boxes, labels = sample
    w, h = image.size
    for _ in range(20):
        # At least a pixel: a few-pixel photo with no box to keep would otherwise be cropped
        # to nothing, and the batch that holds it fail mid-run.
        cw = max(1, int(w * random.uniform(0.3, 1.0)))
        ch = max(1, int(h * random.uniform(0.3, 1.0)))
        x0, y0 = random.randint(0, w - cw), random.randint(0, h - ch)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (
            (centres[:, 0] > x0)
            & (centres[:, 0] < x0 + cw)
            & (centres[:, 1] > y0)
            & (centres[:, 1] < y0 + ch)
        )
        if len(boxes) and not inside.any():
            continue
        kept = boxes[inside] - np.array([x0, y0, x0, y0], np.float32)
        kept = np.clip(kept, 0, [cw, ch, cw, ch]).astype(np.float32)
        return image.crop((x0, y0, x0 + cw, y0 + ch)), kept, labels[inside]
    return sample


def random_flip(sample: Sample) -> Sample:
    """Mirror left to right, boxes with it, half the time."""
    image, boxes, labels = sample
    if random.random() >= 0.5:
        return sample
    w = image.size[0]
    flipped = boxes.copy()
    flipped[:, [0, 2]] = w - boxes[:, [2, 0]]
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped, labels


def random_distort(sample: Sample) -> Sample:
    """Brightness, contrast and saturation changes of up to 30%, each half the time, in
    random order."""
    image, boxes, labels = sample
    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    random.shuffle(enhancers)
    for enhancer in enhancers:
        if random.random() < 0.5:
            image = enhancer(image).enhance(random.uniform(0.7, 1.3))
    return image, boxes, labels


def train_augment(sample: Sample) -> Sample:
    """PicoDet's training augmentations (before the per-batch resize)."""
    return random_flip(random_crop(random_distort(sample)))


def collate(items: Sequence[Sequence], size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Samples (extra trailing fields ignored) -> normalised images [B, 3, size, size] and
    per image targets [K, 5] (label, x1, y1, x2, y2) in the resized pixels."""
    images, targets = [], []
    for image, boxes, labels, *_ in items:
        w, h = image.size
        images.append(preprocess(np.asarray(image), (size, size)))
        scaled = boxes * np.array([size / w, size / h] * 2, np.float32)
        targets.append(torch.from_numpy(np.concatenate([labels[:, None], scaled], 1)).float())
    return torch.from_numpy(np.stack(images)), targets
