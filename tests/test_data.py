"""Datasets, transforms, samplers and the DataLoader helper, on real and generated images."""

from __future__ import annotations

import io
import logging
import math
import os
import random
import re
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import ExifTags, Image, features

from shitu import registry
from shitu.config.schema import DataSplitConfig
from shitu.data.datasets import base
from shitu.data.datasets.folder import ImageFolderDataset
from shitu.data.datasets.grocery import GroceryStoreDataset
from shitu.data.datasets.label_file import LabelFileDataset
from shitu.data.samplers import DistributedBatchSampler, PKSampler
from shitu.data.transforms import build_transforms
from shitu.data.transforms.ops import DecodeImage, ResizeImage
from shitu.engine.data import build_eval_loader, build_train_loader
from shitu.engine.distributed import init_distributed
from shitu.errors import ConfigError, DataError, raised_message
from shitu.index import collect_items
from shitu.index.labels import parse_label_file
from shitu.inference.preprocess import decode_rgb, is_cmyk_jpeg

registry.populate()

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# ---------------------------------------------------------------- helpers


def pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB uint8 image: every pixel distinct enough to detect flips and crops."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array))
    return path


def run_op(name: str, image: np.ndarray, **params) -> np.ndarray:
    """Apply one registered op to a uint8 HWC array (as the pipeline passes it)."""
    return registry.TRANSFORMS.build(name, **params)(image)


def pipeline_output(ops: list[dict], image: np.ndarray) -> torch.Tensor:
    return build_transforms(ops)(png_bytes(image))


class Labels:
    """The least a sampler needs: `labels` and a length."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)


def grocery_lines(root: Path, count: int) -> list[tuple[str, int]]:
    lines = (root / "val.txt").read_text().splitlines()[:: 296 // count][:count]
    return [(line.split(",")[0].strip(), int(line.split(",")[1])) for line in lines]


# ---------------------------------------------------------------- datasets


def test_label_file_dataset_on_real_images(grocery: Path, tmp_path: Path):
    rows = grocery_lines(grocery, 6)
    label_file = tmp_path / "list.txt"
    label_file.write_text("".join(f"{p} {label} {1000 + i}\n" for i, (p, label) in enumerate(rows)))
    dataset = registry.DATASETS.build(
        "ImageNetDataset",
        image_root=str(grocery),
        cls_label_path=str(label_file),
        transform_ops=[
            {"DecodeImage": {"to_rgb": True, "channel_first": False}},
            {"ResizeImage": {"size": [48, 32]}},
            {"NormalizeImage": {"scale": "1.0/255.0", "mean": MEAN, "std": STD, "order": "hwc"}},
        ],
    )
    assert isinstance(dataset, LabelFileDataset)
    assert len(dataset) == 6
    assert dataset.labels == [label for _, label in rows]
    assert dataset.unique_ids == [1000 + i for i in range(6)]
    assert dataset.has_unique_ids
    assert dataset.num_classes == max(dataset.labels) + 1
    assert dataset.class_names is None
    assert dataset.paths[2] == str(grocery / rows[2][0])
    image, label, unique_id = dataset[2]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 48)
    assert (label, unique_id) == (rows[2][1], 1002)
    assert image.min() > -2.2 and image.max() < 2.7  # normalised, not 0..255
    # The clearer alias builds the same dataset.
    alias = registry.DATASETS.build(
        "LabelFileDataset", image_root=str(grocery), cls_label_path=str(label_file)
    )
    assert alias.labels == dataset.labels


def test_tab_delimited_labels_with_spaces(tmp_path: Path):
    for name in ("a.png", "b.png", "my dir/c.png"):
        save_png(tmp_path / name, pattern(8, 8))
    label_file = tmp_path / "list.tsv"
    label_file.write_text(
        "a.png\tPepsi Max\nb.png\tCoca Cola 330ml\n\nmy dir/c.png\tCoca Cola 330ml\n"
    )
    dataset = LabelFileDataset(str(tmp_path), str(label_file), delimiter="\t")
    assert dataset.class_names == ["Coca Cola 330ml", "Pepsi Max"]
    assert dataset.labels == [1, 0, 0]
    assert dataset.num_classes == 2
    assert dataset.unique_ids == [0, 1, 2]  # line positions when the file gives none
    assert not dataset.has_unique_ids
    assert dataset[2][1:] == (0, 2)
    # Split on whitespace, the same file is malformed, and the message says what to do.
    with pytest.raises(DataError, match=r"list\.tsv:2: .*separate columns with tabs"):
        LabelFileDataset(str(tmp_path), str(label_file))


def test_a_label_file_line_ends_only_where_files_end_lines(tmp_path: Path):
    """A file named with U+2028 or a form feed (str.splitlines() ends lines there) split its
    line in two, each refused under a line number the file does not have; a line ends at
    \\n, \\r\\n or \\r only, as gallery label files are read."""
    names = ["a\u2028b.png", "c\x0cd.png", "e\x85f.png"]
    for name in names:
        save_png(tmp_path / name, pattern(8, 8))
    label_file = tmp_path / "list.tsv"
    label_file.write_text("".join(f"{name}\t{i}\n" for i, name in enumerate(names)))
    dataset = LabelFileDataset(str(tmp_path), str(label_file), delimiter="\t")
    assert list(dataset.paths) == [os.path.join(tmp_path, name) for name in names]
    assert dataset.labels == [0, 1, 2]


def test_a_space_in_a_path_is_refused_with_the_line_and_the_tab_advice(tmp_path: Path):
    """Split on whitespace, `my photos/b.png 1` was path `my` and label `photos/b.png`: an
    image `my` not found, a mismatch of unique-id columns, or (labels being names) a wrong
    label."""
    save_png(tmp_path / "a.png", pattern(4, 4))
    save_png(tmp_path / "my photos" / "b.png", pattern(5, 5))
    label_file = tmp_path / "train.txt"
    for text in ("a.png 0\nmy photos/b.png 1\n", "a.png Fanta\nmy photos/b.png Coke\n"):
        label_file.write_text(text)
        with pytest.raises(DataError) as caught:
            LabelFileDataset(str(tmp_path), str(label_file))
        assert str(caught.value) == (
            f"{label_file}:2: the label 'photos/b.png' looks like the end of an image path "
            f"with a space in it, got {text.splitlines()[1]!r}; if paths or labels contain "
            'spaces, separate columns with tabs and set delimiter: "\\t"'
        )
    label_file.write_text("a.png\t0\nmy photos/b.png\t1\n")
    dataset = LabelFileDataset(str(tmp_path), str(label_file), delimiter="\t")
    assert dataset.paths[1] == str(tmp_path / "my photos" / "b.png") and dataset.labels == [0, 1]


@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_a_space_in_a_file_name_is_refused_even_without_an_image_suffix(
    tmp_path: Path, skip_corrupt: bool
):
    """Split on whitespace, `scan 01  Fanta` is path `scan`, label `01`, unique id `Fanta`:
    the file that does exist, `scan 01`, is named instead of an id error or a missing `scan`,
    and skip_corrupt does not hide the mistake."""
    save_png(tmp_path / "a.png", pattern(4, 4))
    save_png(tmp_path / "scan 01", pattern(5, 5))  # no suffix: image files need none
    label_file = tmp_path / "train.txt"
    label_file.write_text("a.png Coke 0\nscan 01  Fanta\n")
    with pytest.raises(DataError) as caught:
        LabelFileDataset(str(tmp_path), str(label_file), skip_corrupt=skip_corrupt)
    assert str(caught.value) == (
        f"{label_file}:2: the image path 'scan 01' has a space in it, so whitespace splits "
        "it into columns, got 'scan 01  Fanta'; if paths or labels contain spaces, separate "
        'columns with tabs and set delimiter: "\\t"'
    )
    label_file.write_text("a.png\tCoke\nscan 01\tFanta\n")
    dataset = LabelFileDataset(str(tmp_path), str(label_file), delimiter="\t")
    assert dataset.class_names == ["Coke", "Fanta"] and len(dataset) == 2


def test_a_class_name_is_one_class_however_its_accents_are_encoded(tmp_path: Path):
    """`Café` typed (one code point for the é) and copied from a macOS folder listing (an e
    and a combining accent) are one class, as a gallery library takes them, not two."""
    for name in "abc":
        save_png(tmp_path / f"{name}.png", pattern(4, 4))
    label_file = tmp_path / "list.tsv"
    label_file.write_text("a.png\tCaf\u00e9\nb.png\tCafe\u0301\nc.png\tTea\n", encoding="utf-8")
    dataset = LabelFileDataset(str(tmp_path), str(label_file), delimiter="\t")
    assert dataset.class_names == ["Caf\u00e9", "Tea"]
    assert dataset.labels == [0, 0, 1] and dataset.num_classes == 2


def test_a_commented_out_line_naming_an_image_is_warned_of(tmp_path: Path, caplog):
    """`#1.jpg 0` is a comment, but a photo of that name was left out of training without a
    word: the warning names it and how to list it; a comment that names no image (or one
    commented out on purpose, `#b.png` for b.png) is skipped quietly."""
    for name in ("#1.png", "b.png"):
        save_png(tmp_path / name, pattern(4, 4))
    label_file = tmp_path / "list.txt"
    label_file.write_text("# photos of 2024\n#1.png 0\n#b.png 1\nb.png 1\n")
    with caplog.at_level(logging.WARNING, logger="shitu"):
        dataset = LabelFileDataset(str(tmp_path), str(label_file))
    assert [Path(path).name for path in dataset.paths] == ["b.png"]
    assert [record.getMessage() for record in caplog.records] == [
        f"{label_file}:2: skipped as a comment (it starts with #), though #1.png is an image "
        "in image_root; to list it, write its path as ./#1.png"
    ]
    label_file.write_text("./#1.png 0\nb.png 1\n")
    assert LabelFileDataset(str(tmp_path), str(label_file)).labels == [0, 1]


def test_label_files_joined_with_their_byte_order_marks_are_read(tmp_path: Path):
    """`cat a.txt b.txt` of two lists Notepad saved puts b's invisible BOM at the start of a
    line, which was read as part of its path: an image 'not found' that is there."""
    for name in "ab":
        save_png(tmp_path / f"{name}.png", pattern(4, 4))
    label_file = tmp_path / "list.txt"
    label_file.write_bytes(b"\xef\xbb\xbfa.png 0\r\n\xef\xbb\xbfb.png 1\r\n")
    dataset = LabelFileDataset(str(tmp_path), str(label_file))
    assert [Path(path).name for path in dataset.paths] == ["a.png", "b.png"]


def test_relabel_maps_sorted_labels_to_consecutive_ids(tmp_path: Path):
    for name in "abcd":
        save_png(tmp_path / f"{name}.png", pattern(4, 4))
    label_file = tmp_path / "list.txt"
    label_file.write_text("a.png 10\nb.png 5\nc.png 10\nd.png 7\n")
    plain = LabelFileDataset(str(tmp_path), str(label_file))
    assert plain.labels == [10, 5, 10, 7] and plain.num_classes == 11
    relabelled = LabelFileDataset(str(tmp_path), str(label_file), relabel=True)
    assert relabelled.labels == [2, 0, 2, 1]
    assert relabelled.num_classes == 3
    assert relabelled.label_map == {5: 0, 7: 1, 10: 2}
    label_file.write_text("a.png -1\nb.png 5\n")
    with pytest.raises(DataError, match=r"list\.txt:1: label -1 is negative; set relabel"):
        LabelFileDataset(str(tmp_path), str(label_file))


def test_labels_mixing_ids_and_names_are_refused(tmp_path: Path):
    """One name among class ids would make every label a name, sorted as text: id 10 would
    come before id 2 and every class would be renumbered unseen."""
    for name in "abcd":
        save_png(tmp_path / f"{name}.png", pattern(4, 4))
    label_file = tmp_path / "list.txt"
    label_file.write_text("a.png 2\nb.png 10\nc.png apple\nd.png 2\n")
    with pytest.raises(DataError) as caught:
        LabelFileDataset(str(tmp_path), str(label_file))
    assert str(caught.value) == (
        f"{label_file}:3: label 'apple' is a class name, but line 1 has the class id '2'; "
        "label every line with an integer class id or every line with a class name (a name "
        "cannot be a bare number)"
    )
    label_file.write_text("a.png 2\nb.png 10\nc.png 1\nd.png 2\n")
    dataset = LabelFileDataset(str(tmp_path), str(label_file), relabel=True)
    assert dataset.label_map == {1: 0, 2: 1, 10: 2} and dataset.labels == [1, 2, 0, 1]
    # Digits joined by an underscore are a name (int() reads '4011_1' as 40111).
    label_file.write_text("a.png 4011_1\nb.png 4011_2\nc.png 4011_1\nd.png +7\n")
    with pytest.raises(DataError, match="label '4011_1' is a class name, but line 4 has the"):
        LabelFileDataset(str(tmp_path), str(label_file))
    label_file.write_text("a.png 4011_1\nb.png 4011_2\nc.png 4011_1\n")
    dataset = LabelFileDataset(str(tmp_path), str(label_file))
    assert dataset.class_names == ["4011_1", "4011_2"] and dataset.num_classes == 2


def test_a_header_line_is_refused_saying_to_comment_it_out(tmp_path: Path):
    """`path label` above the listing: its columns gave another error (a class name among
    ids, a missing image `path`) naming line 1 but not the `#` that comments it out."""
    for name in "ab":
        save_png(tmp_path / f"{name}.png", pattern(4, 4))
    label_file = tmp_path / "list.txt"
    for header, rows, delimiter in (
        ("path label", "a.png 0\nb.png 1\n", None),
        ("image\tclass", "a.png\tx\n", "\t"),
        # no space after the comma: `a.png,0` was read as naming no image, and the header
        # as a class name among class ids
        ("file_name,label", "a.png,0\nb.png,1\n", ","),
    ):
        label_file.write_text(f"{header}\n{rows}")
        with pytest.raises(DataError) as caught:
            LabelFileDataset(str(tmp_path), str(label_file), delimiter=delimiter)
        head = re.split(r"[\s,]", header)[0]
        assert str(caught.value) == (
            f"{label_file}:1: {header!r} looks like a header, not an image and its label (no "
            f"image {head!r} in image_root); start the line with # to comment it out"
        )
        label_file.write_text(f"# {header}\n{rows}")  # as it says: taken
        dataset = LabelFileDataset(str(tmp_path), str(label_file), delimiter=delimiter)
        assert len(dataset) == rows.count("\n")


def test_images_listed_more_than_once_are_warned_of(tmp_path: Path, caplog):
    """An image listed under two labels (label files merged) is trained towards both:
    kept, as a repeat may be meant, but named, those under different labels first."""
    for name in "abc":
        save_png(tmp_path / f"{name}.png", pattern(4, 4))
    label_file = tmp_path / "list.txt"
    label_file.write_text("c.png pear\nb.png pear\na.png apple\nc.png pear\n./b.png apple\n")
    with caplog.at_level(logging.WARNING):
        dataset = LabelFileDataset(str(tmp_path), str(label_file))
    assert len(dataset) == 5
    assert (
        f"label file {label_file}: 2 images are listed more than once, 1 under different "
        f"labels ({tmp_path}/b.png (line 2: pear, line 5: apple); {tmp_path}/c.png (line 1: "
        "pear, line 4: pear)); each listing is a sample of its own"
    ) in caplog.text
    caplog.clear()
    label_file.write_text("a.png apple\nb.png pear\n")
    with caplog.at_level(logging.WARNING):
        LabelFileDataset(str(tmp_path), str(label_file))
    assert not caplog.text


def test_a_file_name_that_is_not_utf8_is_an_image_like_any_other(tmp_path: Path):
    """A Windows zip's cp1252 `café.png` unpacked on Linux: Python names it with a surrogate
    escape, which the dataset's packed path list stored (and a checkpoint's digest hashed)
    only as UTF-8, failing with a UnicodeEncodeError."""
    name = os.fsdecode(b"caf\xe9.png")
    save_png(tmp_path / "drinks" / name, pattern(4, 4))
    save_png(tmp_path / "drinks" / "tea.png", pattern(4, 4, seed=1))
    dataset = ImageFolderDataset(str(tmp_path))
    assert dataset.paths[0] == str(tmp_path / "drinks" / name)
    assert dataset[0][0].shape == (3, 4, 4) and len(dataset.listing_digest) == 64


def test_a_label_or_class_file_that_is_no_regular_file_is_named_as_what_it_is(
    grocery: Path, tmp_path: Path
):
    """A label file or classes.csv given as a folder, a device or a FIFO was "not found"
    (a folder: "not found (it is a directory)"): each is named as what it is, and the
    FIFO is refused without waiting for a writer."""
    fifo = tmp_path / "list.fifo"
    os.mkfifo(fifo)
    listing = str(grocery / "val.txt")
    for given, kind in (
        (tmp_path, " is a folder, not a text file"),
        (Path("/dev/null"), ": cannot read it (a character device, not a text file)"),
        (fifo, ": cannot read it (a FIFO (named pipe), not a text file)"),
    ):
        with pytest.raises(DataError) as caught:
            LabelFileDataset(str(tmp_path), str(given))
        assert str(caught.value).endswith(f"label file {given}{kind}")
        with pytest.raises(DataError) as caught:
            GroceryStoreDataset(str(grocery), listing, class_file=str(given))
        assert str(caught.value) == f"class file {given}{kind}"


def test_label_file_errors_name_the_file_and_line(tmp_path: Path, monkeypatch):
    save_png(tmp_path / "a.png", pattern(4, 4))
    label_file = tmp_path / "list.txt"
    with pytest.raises(DataError, match=r"label file .*missing\.txt not found"):
        LabelFileDataset(str(tmp_path), str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="image_root .*nowhere: no such folder$"):
        LabelFileDataset(str(tmp_path / "nowhere"), str(label_file))
    # a file in the folder's place is said to be one, not "not a directory" as a typo was
    with pytest.raises(DataError, match=r"image_root .*a\.png is a file, not a folder of images$"):
        LabelFileDataset(str(tmp_path / "a.png"), str(label_file))
    with pytest.raises(DataError, match=r"root .*a\.png is a file, not a folder of images$"):
        ImageFolderDataset(str(tmp_path / "a.png"))
    monkeypatch.chdir(tmp_path)  # a relative path says where it was looked for
    cwd = f"(relative paths are taken from the working directory, {tmp_path})"
    with pytest.raises(DataError, match=rf"image_root nowhere: no such folder {re.escape(cwd)}"):
        LabelFileDataset("nowhere", "missing.txt")
    with pytest.raises(DataError, match=rf"label file missing\.txt not found {re.escape(cwd)}"):
        LabelFileDataset(".", "missing.txt")
    label_file.write_text("a.png 0\njust-a-path\n")
    with pytest.raises(DataError, match=r"list\.txt:2: expected 'path label \[unique_id\]'"):
        LabelFileDataset(str(tmp_path), str(label_file))
    label_file.write_text("a.png 0 7\na.png 0 x\n")
    with pytest.raises(DataError, match=r"list\.txt:2: unique id 'x' is not an integer"):
        LabelFileDataset(str(tmp_path), str(label_file))
    # Read by int(), `4011_1` was the id 40111 (another image's) and `７` (full width) 7.
    for written in ("4011_1", "\uff17"):
        label_file.write_text(f"a.png 0 40111\na.png 0 {written}\n")
        with pytest.raises(DataError, match=rf"list\.txt:2: unique id '{written}' is not an"):
            LabelFileDataset(str(tmp_path), str(label_file))
    # Past int64 (two product codes run together): an OverflowError that named no line.
    for listed, where in (("0 7\na.png 0 ", "line 2: unique id"), ("", "line 1: label")):
        label_file.write_text(f"a.png {listed}12345678901234567890\n")
        said = (
            f"label file {label_file}: {where} 12345678901234567890 does not fit the 64-bit "
            "integer it is kept in (-9223372036854775808 to 9223372036854775807)"
        )
        with pytest.raises(DataError, match=f"^{re.escape(said)}$"):
            LabelFileDataset(str(tmp_path), str(label_file))
    assert LabelFileDataset(str(tmp_path), str(label_file), relabel=True).labels == [0]
    label_file.write_text("a.png 0 -3\na.png 0 +7\n")
    assert LabelFileDataset(str(tmp_path), str(label_file)).unique_ids == [-3, 7]
    label_file.write_text("a.png 0 7\na.png 0\n")
    with pytest.raises(DataError, match=r"list\.txt:2: no unique id, but line 1 has one"):
        LabelFileDataset(str(tmp_path), str(label_file))
    label_file.write_text("a.png\tCoca Cola\n")
    with pytest.raises(DataError, match=r"list\.txt:1: unique id 'Cola' .*tabs and set delimiter"):
        LabelFileDataset(str(tmp_path), str(label_file))
    # `delimiter: \t` unquoted in YAML is a backslash and a t: taken for the tab it means.
    unquoted = yaml.safe_load("delimiter: \\t")["delimiter"]
    assert unquoted == "\\t"
    dataset = LabelFileDataset(str(tmp_path), str(label_file), delimiter=unquoted)
    assert dataset.class_names == ["Coca Cola"]
    # An empty delimiter splits nothing: refused naming the key, as a config loads too.
    with pytest.raises(ValueError, match="delimiter: empty; leave it out"):
        LabelFileDataset(str(tmp_path), str(label_file), delimiter="")
    params = {"image_root": str(tmp_path), "cls_label_path": str(label_file), "delimiter": ""}
    with pytest.raises(ConfigError, match="delimiter: empty; .* in dataset 'ImageNetDataset'"):
        registry.DATASETS.validate("ImageNetDataset", params)
    label_file.write_text("\n\n# path label\n")
    with pytest.raises(DataError, match="lists no images"):
        LabelFileDataset(str(tmp_path), str(label_file))
    label_file.write_text("# path label id\na.png 3\n")  # a header: no line of its own
    dataset = LabelFileDataset(str(tmp_path), str(label_file))
    assert dataset.labels == [3] and dataset.unique_ids == [0]
    label_file.write_text("a.png Café\r\n", encoding="utf-16")  # PowerShell 5's `>` writes this
    assert LabelFileDataset(str(tmp_path), str(label_file)).class_names == ["Café"]
    label_file.write_text("a.png Café\n", encoding="cp1252")  # not to be guessed at
    with pytest.raises(DataError, match=r"list\.txt is not UTF-8 or UTF-16 text: save it as UTF-8"):
        LabelFileDataset(str(tmp_path), str(label_file))
    # UTF-16 without its BOM is valid UTF-8 with a NUL beside each ASCII character: it was
    # read as such, and refused for a line 2 of '\x00' (or a label of NULs in a label file)
    label_file.write_bytes("a.png 3\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"list\.txt is not UTF-8 or UTF-16 text: save it as UTF-8"):
        LabelFileDataset(str(tmp_path), str(label_file))
    with pytest.raises(DataError, match=r"list\.txt: not a label file \(not UTF-8 or UTF-16"):
        collect_items([label_file])
    # an image given as the label file is not to be saved as UTF-8
    with pytest.raises(DataError) as caught:
        LabelFileDataset(str(tmp_path), str(tmp_path / "a.png"))
    assert str(caught.value) == (
        f"cls_label_path: label file {tmp_path / 'a.png'} is an image, not a text file listing "
        "images"
    )


def test_missing_images_are_counted_and_shown(tmp_path: Path):
    save_png(tmp_path / "a.png", pattern(4, 4))
    label_file = tmp_path / "list.txt"
    label_file.write_text("a.png 0\n" + "".join(f"gone{i}.png 1\n" for i in range(8)))
    with pytest.raises(DataError) as info:
        LabelFileDataset(str(tmp_path), str(label_file))
    message = str(info.value)
    assert "8 of 9 listed images do not exist" in message
    assert "gone0.png (line 2)" in message and "gone4.png (line 6)" in message
    assert "gone5.png" not in message and "and 3 more" in message
    # skip_corrupt leaves them out instead, and says so.
    dataset = LabelFileDataset(str(tmp_path), str(label_file), skip_corrupt=True)
    assert len(dataset) == 1 and len(dataset.skipped) == 8
    assert dataset.skipped[0] == (str(tmp_path / "gone0.png"), "file not found")
    assert "backslash" not in message
    # A listed folder (or device) is named as what it is: it was said not to exist.
    (tmp_path / "folder.png").mkdir()
    label_file.write_text("a.png 0\nfolder.png 1\n/dev/null 1\ngone0.png 1\n")
    with pytest.raises(DataError) as info:
        LabelFileDataset(str(tmp_path), str(label_file))
    assert str(info.value).startswith(
        f"label file {label_file}: 3 of 4 listed images are not image files: "
        f"{tmp_path / 'folder.png'} (line 2: a folder, not an image file), /dev/null (line 3: "
        f"not a regular file), {tmp_path / 'gone0.png'} (line 4: file not found); "
    )
    dataset = LabelFileDataset(str(tmp_path), str(label_file), skip_corrupt=True)
    assert dataset.skipped[0] == (str(tmp_path / "folder.png"), "a folder, not an image file")
    # A list written on Windows: its separators are named, not only the files.
    (tmp_path / "sub").mkdir()
    save_png(tmp_path / "sub" / "b.png", pattern(4, 4))
    label_file.write_text("a.png 0\nsub\\b.png 1\n")
    with pytest.raises(DataError) as info:
        LabelFileDataset(str(tmp_path), str(label_file))
    assert str(info.value).endswith(
        f"paths are read relative to image_root={str(tmp_path)!r}; a backslash separates no "
        "folders here: write the paths with '/' (skip_corrupt: true leaves them out)"
    )


def test_a_listed_name_whose_accents_the_file_encodes_otherwise_is_told_so(tmp_path: Path):
    """Linux keeps `café.png` typed (é one character) and as macOS names it (e and an
    accent) apart: the error showed the listed path, which looks the same as the file's."""
    composed, decomposed = "caf\u00e9.png", "cafe\u0301.png"
    save_png(tmp_path / decomposed, pattern(4, 4))
    label_file = tmp_path / "list.txt"
    label_file.write_text(f"{composed} 0\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        LabelFileDataset(str(tmp_path), str(label_file))
    assert str(info.value).endswith(
        f"; {tmp_path / decomposed} is there, its accented letters decomposed (Unicode NFD, as "
        "macOS names files) where the list has them composed: list the names as the files "
        "have them, or rename the files (skip_corrupt: true leaves them out)"
    )
    label_file.write_text(f"{decomposed} 0\n", encoding="utf-8")
    assert len(LabelFileDataset(str(tmp_path), str(label_file))) == 1


def corrupt_files(grocery: Path, folder: Path) -> tuple[Path, Path]:
    jpeg = (grocery / grocery_lines(grocery, 1)[0][0]).read_bytes()
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    return truncated, garbage


def test_corrupt_image_raises_data_error_naming_the_file(grocery: Path, tmp_path: Path):
    truncated, garbage = corrupt_files(grocery, tmp_path)
    save_png(tmp_path / "good.png", pattern(6, 6))
    label_file = tmp_path / "list.txt"
    label_file.write_text("good.png 0\ntruncated.jpg 1\ngarbage.jpg 2\n")
    dataset = LabelFileDataset(str(tmp_path), str(label_file))
    assert dataset[0][0].shape == (3, 6, 6)
    for index, path in ((1, truncated), (2, garbage)):
        with pytest.raises(DataError) as info:
            dataset[index]
        assert str(path) in str(info.value)
        assert "cannot decode image" in str(info.value)
        assert "skip_corrupt: true" in str(info.value)


def test_a_file_of_a_few_bytes_is_an_image_that_cannot_be_decoded():
    """A file of 1 to 3 bytes (not text) failed with a struct.error traceback from Pillow's
    BMP check, which unpacks 4 bytes, stopping `shitu extract` and `recognize` on it."""
    for data in (b"\x00", b"BM", b"\xff\xd8\xff"):
        with pytest.raises(DataError, match="^cannot decode image: "):
            decode_rgb(data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow's, of the cut TIFFs
def test_a_tiff_in_a_pixel_format_pillow_cannot_decode_is_not_called_corrupt():
    """A 3-channel float32 TIFF (as OpenCV saves a float image) was "unknown or corrupt
    format": Pillow knows TIFF files, but has no mode for floating-point colour."""
    ok, encoded = cv2.imencode(".tiff", np.random.default_rng(0).random((8, 8, 3), np.float32))
    data = encoded.tobytes()
    assert ok and data.startswith(b"II*\0")
    reason = (
        "a TIFF image in a pixel format Pillow cannot decode (unknown pixel mode; "
        "floating-point colour, say): save it with 8-bit samples, as JPEG or PNG"
    )
    with pytest.raises(DataError) as info:
        decode_rgb(data)
    assert str(info.value) == f"cannot decode image: {reason}"
    # A TIFF cut short, or its header followed by zeros, is still a corrupt file.
    for corrupt in (data[:50], data[:8] + bytes(100)):
        with pytest.raises(DataError) as info:
            decode_rgb(corrupt)
        assert str(info.value) == "cannot decode image: unknown or corrupt format"


def test_skip_corrupt_drops_bad_images_at_start_up(grocery: Path, tmp_path: Path, caplog):
    corrupt_files(grocery, tmp_path)
    save_png(tmp_path / "good.png", pattern(6, 6))
    save_png(tmp_path / "good2.png", pattern(5, 5))
    label_file = tmp_path / "list.txt"
    label_file.write_text(
        "good.png 0\ntruncated.jpg 1\ngarbage.jpg 2\nmissing.png 3\ngood2.png 4\n"
    )
    with caplog.at_level(logging.WARNING):
        dataset = LabelFileDataset(str(tmp_path), str(label_file), skip_corrupt=True)
    # Named, with why: an evaluation set said nothing, a training summary only counted them.
    (said,) = caplog.messages
    assert said.startswith(
        f"label file {label_file}: skip_corrupt left out 3 of 5 listed images: "
        f"{tmp_path / 'missing.png'} (line 4: file not found), {tmp_path / 'truncated.jpg'} "
        "(line 2: "
    ), said
    assert len(dataset) == 2
    assert dataset.labels == [0, 4]
    assert dataset.unique_ids == [0, 4]  # ids are kept from the file positions
    skipped = dict(dataset.skipped)
    assert set(skipped) == {
        str(tmp_path / n) for n in ("truncated.jpg", "garbage.jpg", "missing.png")
    }
    assert "truncated" in skipped[str(tmp_path / "truncated.jpg")]
    # Said as the loader says it, not as "cannot identify image file <_io.BytesIO ...>"
    assert (
        skipped[str(tmp_path / "garbage.jpg")] == "cannot decode image: a text file, not an image"
    )
    assert dataset[1][0].shape == (3, 5, 5)
    # An image that breaks after the check still fails loudly.
    (tmp_path / "good2.png").write_bytes(b"\x00broken later")
    with pytest.raises(
        DataError,
        match="good2.png: cannot decode image: unknown or corrupt format.*passed the start-up",
    ):
        dataset[1]
    label_file.write_text("truncated.jpg 1\n")
    with pytest.raises(DataError) as caught:
        LabelFileDataset(str(tmp_path), str(label_file), skip_corrupt=True)
    assert str(caught.value).startswith(
        f"label file {label_file}: none of the 1 listed images can be used: "
        f"{tmp_path / 'truncated.jpg'} (line 1: "
    )
    # All of them missing (a wrong image_root, most often): where they were looked for.
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError) as caught:
        LabelFileDataset(str(tmp_path / "sub"), str(label_file), skip_corrupt=True)
    assert str(caught.value) == (
        f"label file {label_file}: none of the 1 listed images can be used: "
        f"{tmp_path / 'sub' / 'truncated.jpg'} (line 1: file not found); paths are read "
        f"relative to image_root={str(tmp_path / 'sub')!r}"
    )


def test_skip_corrupt_drops_images_of_a_size_the_transforms_cannot_take(
    tmp_path: Path, thin_limit: int
):
    """A photo too elongated to resize its short side, or smaller than a crop after the
    resize, fails when loaded: skip_corrupt leaves it out at start-up, with the reason
    (sizes as the ops before would make them, EXIF orientation applied); without it the
    error names the file and the fix."""
    save_png(tmp_path / "good.png", pattern(40, 30))
    save_png(tmp_path / "thin.png", pattern(400, 2))
    save_png(tmp_path / "wide.png", pattern(30, 100))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # a quarter turn: upright it is 30x100
    Image.fromarray(pattern(30, 100)).save(tmp_path / "turned.jpg", exif=exif)
    label_file = tmp_path / "list.txt"
    label_file.write_text("good.png 0\nthin.png 1\nwide.png 2\nturned.jpg 3\n")
    ops = [{"ResizeImage": {"resize_short": 32}}, {"CropImage": {"size": [32, 40]}}]

    def build(skip_corrupt: bool) -> LabelFileDataset:
        return LabelFileDataset(str(tmp_path), str(label_file), ops, skip_corrupt=skip_corrupt)

    dataset = build(skip_corrupt=True)
    assert dataset.labels == [0, 3] and [image.shape for image, *_ in dataset] == [(3, 40, 32)] * 2
    assert dataset.skipped == [
        (
            str(tmp_path / "thin.png"),
            "ResizeImage: image 2x400 is too elongated to resize its short side to 32: that "
            f"makes 32x6400 pixels, over the limit of {thin_limit / 1e6:g} megapixels (SHITU_MAX_MEGAPIXELS)",
        ),
        (str(tmp_path / "wide.png"), "CropImage: image 107x32 is smaller than the crop 32x40"),
    ]
    dataset = build(skip_corrupt=False)
    with pytest.raises(
        DataError,
        match=r"thin\.png: ResizeImage: image 2x400 is too elongated .*MAX_MEGAPIXELS\); set "
        "skip_corrupt: true in the dataset config to leave such images out$",
    ):
        dataset[1]


def test_skip_corrupt_queues_a_bounded_number_of_checks(tmp_path: Path, monkeypatch):
    """The start-up check queues a few images per thread, not the whole dataset (whose
    queue an interrupt would wait out), and keeps the order. Checks run lazily, when their
    result is taken, so what is queued is counted exactly, without threads or timing."""
    queued = Counter()

    class LazyFuture(Future):
        def __init__(self, run: Callable[[], object]) -> None:
            super().__init__()
            self.run = run

        def result(self, timeout: float | None = None) -> object:
            if not self.done():
                self.set_result(self.run())
                queued["now"] -= 1
            return super().result(timeout)

    class LazyPool(Executor):
        def __init__(self, max_workers: int) -> None:
            pass

        def submit(self, fn: Callable, /, *args: object) -> Future:
            queued["now"] += 1
            queued["most"] = max(queued["most"], queued["now"])
            return LazyFuture(lambda: fn(*args))

    monkeypatch.setattr(base, "ThreadPoolExecutor", LazyPool)
    monkeypatch.setattr(
        base, "check_image", lambda path: "bad" if path.endswith("7.png") else (4, 4)
    )
    count = 500
    for index in range(count):
        (tmp_path / f"{index}.png").touch()
    label_file = tmp_path / "list.txt"
    label_file.write_text("".join(f"{index}.png {index}\n" for index in range(count)))
    dataset = LabelFileDataset(str(tmp_path), str(label_file), skip_corrupt=True)
    assert dataset.labels == [index for index in range(count) if index % 10 != 7]
    assert [path for path, _ in dataset.skipped] == [
        str(tmp_path / f"{index}.png") for index in range(7, count, 10)
    ]
    assert queued["now"] == 0 and 0 < queued["most"] <= 64


def test_reused_scans_check_each_image_once_until_the_listing_changes(tmp_path: Path, monkeypatch):
    """Built again within `reused_scans`, a dataset takes the first build's start-up scan;
    a listing changed to name other images is scanned again, and outside it every build is."""
    checked = Counter()
    check_image = base.check_image
    monkeypatch.setattr(
        base, "check_image", lambda path: checked.update([path]) or check_image(path)
    )
    save_png(tmp_path / "good.png", pattern(4, 4))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    label_file = tmp_path / "list.txt"
    label_file.write_text("good.png 0\nbad.png 1\nmissing.png 2\n")

    def build() -> LabelFileDataset:
        return LabelFileDataset(str(tmp_path), str(label_file), skip_corrupt=True)

    with base.reused_scans():
        first = build()
        assert checked.total() == 2  # the missing file is not decoded
        again = build()
        assert checked.total() == 2
        for dataset in (first, again):
            assert list(dataset.paths) == [str(tmp_path / "good.png")]
            assert [path for path, _ in dataset.skipped] == [
                str(tmp_path / name) for name in ("missing.png", "bad.png")
            ]
        save_png(tmp_path / "new.png", pattern(5, 5))
        label_file.write_text("good.png 0\nbad.png 1\nnew.png 3\n")
        assert len(build()) == 2 and checked.total() == 5
    build()
    assert checked.total() == 8


def test_transform_failure_names_file_and_op(tmp_path: Path):
    save_png(tmp_path / "small.png", pattern(10, 10))
    label_file = tmp_path / "list.txt"
    label_file.write_text("small.png 0\n")
    dataset = LabelFileDataset(
        str(tmp_path), str(label_file), transform_ops=[{"CropImage": {"size": 20}}]
    )
    with pytest.raises(
        DataError, match=r"small\.png: CropImage: image 10x10 is smaller than the crop"
    ):
        dataset[0]


def test_grocery_store_dataset(grocery: Path):
    fine = GroceryStoreDataset(str(grocery), str(grocery / "val.txt"))
    lines = (grocery / "val.txt").read_text().splitlines()
    assert len(fine) == len(lines) == 296
    assert fine.num_classes == 81 and len(fine.class_names) == 81
    assert fine.class_names[0] == "Golden-Delicious"
    assert fine.labels == [int(line.split(",")[1]) for line in lines]
    assert fine.unique_ids == list(range(296)) and not fine.has_unique_ids
    coarse = registry.DATASETS.build(
        "GroceryStoreDataset",
        image_root=str(grocery),
        cls_label_path=str(grocery / "val.txt"),
        label_level="coarse",
        transform_ops=[{"ResizeImage": {"resize_short": 40}}, {"CropImage": {"size": 32}}],
    )
    assert coarse.num_classes == 43 and coarse.class_names[:3] == ["Apple", "Avocado", "Banana"]
    assert coarse.labels == [int(line.split(",")[2]) for line in lines]
    image, label, _ = coarse[100]
    assert image.shape == (3, 32, 32) and image.min() >= 0 and image.max() <= 255
    assert coarse.class_names[label] in lines[100]


def test_grocery_store_dataset_joins_listings(grocery: Path, tmp_path: Path):
    """A final run trains on train + val: several listings become one dataset, in order,
    with unique ids across them and errors that name the listing at fault."""
    listings = [str(grocery / "val.txt"), str(grocery / "train.txt")]
    both = GroceryStoreDataset(str(grocery), listings)
    val = GroceryStoreDataset(str(grocery), listings[0])
    assert len(both) == 296 + 2640 and both.num_classes == 81
    assert both.paths[:296] == list(val.paths) and both.labels[:296] == list(val.labels)
    assert both.paths[296].startswith(str(grocery / "train"))
    assert both.unique_ids == list(range(len(both)))
    broken = tmp_path / "broken.txt"
    broken.write_text("train/x.jpg, 1, one\n")
    with pytest.raises(DataError, match=r"broken\.txt:1: class id 'one' is not an integer"):
        GroceryStoreDataset(str(grocery), [listings[0], str(broken)], label_level="coarse")
    # Read by int(), `4_0` was the class 40 and `３` (full width) the class 3.
    for written in ("4_0", "\uff13"):
        broken.write_text(f"train/x.jpg, {written}, 1\n")
        with pytest.raises(DataError, match=rf"broken\.txt:1: class id '{written}' is not an"):
            GroceryStoreDataset(str(grocery), str(broken))
        table = tmp_path / "classes.csv"
        table.write_text(f"Apple,0,Fruit,0\nPear,{written},Fruit,0\n")
        with pytest.raises(DataError, match=r"classes\.csv:2: expected 'name, id, coarse name"):
            GroceryStoreDataset(str(grocery), listings[0], class_file=str(table))
    with pytest.raises(DataError, match="names no label file"):
        GroceryStoreDataset(str(grocery), [])


def test_a_header_line_in_a_grocery_listing_is_refused_saying_to_comment_it_out(
    grocery: Path, tmp_path: Path
):
    """A header above a Grocery Store listing (`path, fine_id, coarse_id`, as a
    spreadsheet saves one) was refused as "class id 'fine_id' is not an integer", not
    said to be a header that `#` comments out, as the other datasets' listings are."""
    rows = (grocery / "val.txt").read_text().splitlines()[:3]
    listing = tmp_path / "mine.txt"
    listing.write_text("\n".join(["path, fine_id, coarse_id", *rows]) + "\n")
    with pytest.raises(DataError) as caught:
        GroceryStoreDataset(str(grocery), [str(grocery / "val.txt"), str(listing)])
    assert str(caught.value) == (
        f"{listing}:1: 'path, fine_id, coarse_id' looks like a header, not an image and its "
        "label (no image 'path' in image_root); start the line with # to comment it out"
    )
    listing.write_text("\n".join(["# path, fine_id, coarse_id", *rows]) + "\n")
    assert len(GroceryStoreDataset(str(grocery), str(listing))) == 3


def test_a_grocery_class_table_given_as_a_listing_is_named_for_what_it_is(
    grocery: Path, tmp_path: Path
):
    """Grocery's classes.csv given as a listing was said to have a header to comment out;
    commented out, its rows were refused next. Training lists and gallery lists alike."""
    table = grocery / "classes.csv"
    expected = (
        f"{table}:1: a table of class names and ids (the Grocery Store dataset's classes.csv, "
        "by its header), not a listing of images and their labels (that dataset's are "
        "train.txt, val.txt and test.txt)"
    )
    for read in (
        lambda: GroceryStoreDataset(str(grocery), str(table)),
        lambda: LabelFileDataset(str(grocery), str(table)),
        lambda: LabelFileDataset(str(grocery), str(table), delimiter=","),
        lambda: parse_label_file(table),
    ):
        with pytest.raises(DataError) as caught:
            read()
        assert str(caught.value) == expected
    # Grocery's header as it is, not any table's: another's header is no sign of that file.
    rows = (grocery / "val.txt").read_text().splitlines()[:2]
    listing = tmp_path / "mine.txt"
    listing.write_text("\n".join(["class name, class id, image", *rows]) + "\n")
    with pytest.raises(DataError, match="mine.txt:1: 'class name, class id, image' looks like a"):
        GroceryStoreDataset(str(grocery), str(listing))


def test_a_grocery_listing_given_as_its_class_table_is_named_for_what_it_is(grocery: Path):
    """val.txt given as class_file was refused as "class id 0 named both .../001.jpg and
    .../002.jpg" (fine), or by its first row's shape (coarse, iconic): not as a listing."""
    listing = grocery / "val.txt"
    first = listing.read_text().split(",", 1)[0]
    expected = (
        f"{listing}:1: a listing of images ('path, fine_id, coarse_id'), not a table of class "
        f"names and ids (the Grocery Store dataset's classes.csv): its first column {first!r} "
        "is an image, not a class name"
    )
    for given, level in ((str(listing), "fine"), (str(listing), "coarse"), ("iconic", "fine")):
        with pytest.raises(DataError) as caught:
            GroceryStoreDataset(str(grocery), given, label_level=level, class_file=str(listing))
        assert str(caught.value) == expected


def test_a_grocery_label_level_other_than_fine_or_coarse_is_refused(grocery: Path):
    """`label_level="Fine"` given in Python (a config's is checked by the registry) was
    taken for "coarse": 43 classes, all apples one, without a word."""
    for level in ("Fine", "medium"):
        with pytest.raises(ConfigError) as caught:
            GroceryStoreDataset(str(grocery), str(grocery / "val.txt"), label_level=level)
        assert str(caught.value) == f"label_level: expected 'fine' or 'coarse', got {level!r}"


def test_a_grocery_class_file_is_read_as_label_files_are(grocery: Path, tmp_path: Path):
    """classes.csv saved by Excel as "Unicode Text" (UTF-16) was refused with Python's
    "'utf-8' codec can't decode byte 0xff", a missing one with "[Errno 2] ...": read as
    label files are, and refused in their words; its header is optional."""
    listing = str(grocery / "val.txt")
    utf16 = tmp_path / "classes.csv"
    utf16.write_text((grocery / "classes.csv").read_text(encoding="utf-8"), encoding="utf-16")
    read = GroceryStoreDataset(str(grocery), listing, class_file=str(utf16))
    assert read.class_names == GroceryStoreDataset(str(grocery), listing).class_names
    missing = tmp_path / "none.csv"
    for class_file, said in (
        (missing, f"class file {missing} not found"),
        (grocery / "val", f"class file {grocery / 'val'} is a folder, not a text file"),
    ):
        with pytest.raises(DataError) as caught:
            GroceryStoreDataset(str(grocery), listing, class_file=str(class_file))
        assert str(caught.value) == said
    # one saved without its header lost its first class: "fine class ids are not 0..79"
    headless = tmp_path / "headless.csv"
    headless.write_text("".join((grocery / "classes.csv").read_text().splitlines(True)[1:]))
    read = GroceryStoreDataset(str(grocery), listing, class_file=str(headless))
    assert read.class_names == GroceryStoreDataset(str(grocery), listing).class_names
    assert len(GroceryStoreDataset(str(grocery), "iconic", class_file=str(headless))) == 81
    utf16.write_bytes("Name,0\ncaf\u00e9,1\n".encode("cp1252"))
    with pytest.raises(DataError) as caught:
        GroceryStoreDataset(str(grocery), listing, class_file=str(utf16))
    assert str(caught.value) == f"class file {utf16} is not UTF-8 or UTF-16 text: save it as UTF-8"


def test_grocery_store_dataset_takes_paths(grocery: Path):
    """Path objects, as the other datasets take them: a listing given as a Path was
    iterated as a list of listings (TypeError: 'PosixPath' object is not iterable)."""
    val = GroceryStoreDataset(str(grocery), str(grocery / "val.txt"))
    for listing in (grocery / "val.txt", [grocery / "val.txt"]):
        given = GroceryStoreDataset(grocery, listing)
        assert list(given.paths) == list(val.paths) and given.labels == val.labels
    both = GroceryStoreDataset(grocery, [grocery / "val.txt", "iconic"])
    assert len(both) == len(val) + 81


def test_a_grocery_listing_given_to_a_label_file_dataset_names_the_right_one(
    grocery: Path,
):
    """Split on whitespace, `path, 3, 1` gave the path `path,` and the class name `3,`."""
    with pytest.raises(DataError) as caught:
        LabelFileDataset(str(grocery), str(grocery / "val.txt"))
    assert str(caught.value).startswith(f"{grocery / 'val.txt'}:1: the columns are separated by")
    assert str(caught.value).endswith(
        "a Grocery Store listing ('path, fine_id, coarse_id') is read by name: "
        "GroceryStoreDataset, another by delimiter: ','"
    )


def test_a_paddleclas_label_file_given_to_the_grocery_dataset_names_the_right_one(
    grocery: Path, tmp_path: Path
):
    """A copied Grocery config pointed at one's own `path label` list: the dataset to use."""
    listing = tmp_path / "mine.txt"
    listing.write_text("train/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg 0\n")
    with pytest.raises(DataError) as caught:
        GroceryStoreDataset(str(grocery), str(listing))
    assert str(caught.value).endswith(
        "; a 'path label' file is an ImageNetDataset's (name: ImageNetDataset)"
    )
    listing.write_text("train/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg, 0\n")
    with pytest.raises(DataError, match=r"expected 'path, fine_id, coarse_id', got '[^']*'$"):
        GroceryStoreDataset(str(grocery), str(listing))


def test_grocery_store_iconic_split(grocery: Path, tmp_path: Path):
    """`cls_label_path: iconic` is the packshot gallery: one image per class from classes.csv."""
    iconic = GroceryStoreDataset(str(grocery), "iconic")
    assert len(iconic) == 81 and iconic.labels == list(range(81))
    assert all(Path(path).is_file() for path in iconic.paths)
    assert Path(iconic.paths[0]).name == "Golden-Delicious_Iconic.jpg"
    coarse = GroceryStoreDataset(str(grocery), ["iconic"], label_level="coarse")
    assert coarse.labels[:3] == [0, 0, 0] and coarse.class_names[coarse.labels[-1]] != "Apple"
    image, label, _ = GroceryStoreDataset(
        str(grocery), "iconic", transform_ops=[{"ResizeImage": {"size": [32, 32]}}]
    )[5]
    assert image.shape == (3, 32, 32) and label == 5

    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(DataError, match=r"'iconic' lists the packshots named in classes\.csv"):
        GroceryStoreDataset(str(bare), "iconic")
    no_paths = tmp_path / "classes.csv"
    no_paths.write_text("name,id,coarse name,coarse id\nGolden-Delicious,0,Apple,0\n")
    with pytest.raises(DataError, match=r"classes\.csv:2: no iconic image path"):
        GroceryStoreDataset(str(grocery), "iconic", class_file=str(no_paths))


def test_image_folder_dataset(tmp_path: Path, caplog):
    root = tmp_path / "root"
    save_png(root / "b_class" / "x.png", pattern(4, 4))
    save_png(root / "a_class" / "sub" / "y.png", pattern(5, 5))
    save_png(root / "a_class" / "w.PNG", pattern(6, 6))
    (root / "a_class" / "notes.txt").write_text("not an image")
    Image.fromarray(pattern(4, 4)).save(root / "b_class" / "z.gif")
    save_png(root / ".thumbnails" / "t.png", pattern(4, 4))  # hidden: not a class
    with caplog.at_level(logging.WARNING):
        dataset = registry.DATASETS.build("ImageFolderDataset", root=str(root))
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.class_names == ["a_class", "b_class"] and dataset.num_classes == 2
    assert [Path(p).name for p in dataset.paths] == ["w.PNG", "y.png", "x.png"]
    assert dataset.labels == [0, 0, 1]
    assert dataset[1][0].shape == (3, 5, 5)
    assert f"skipped 1 file in {root} (.gif x1; e.g. {root / 'b_class' / 'z.gif'})" in caplog.text
    assert "no images in" not in caplog.text
    with caplog.at_level(logging.WARNING):
        gifs = registry.DATASETS.build("ImageFolderDataset", root=str(root), extensions=["GIF"])
    assert [Path(p).name for p in gifs.paths] == ["z.gif"] and gifs.labels == [1]
    # a_class has no GIF: still class 0, which a class_num counting folders with photos misses.
    message = f"image folder {root}: no images in class folder(s) a_class, which count as"
    assert f"{message} classes all the same" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderDataset(str(tmp_path / "empty"))
    # a label file's settings left beside root (the dataset's name swapped in a copied
    # config, or with -o): said what they are and how to drop them, not 'unknown key'
    with pytest.raises(ConfigError) as refused:
        registry.DATASETS.validate("ImageFolderDataset", {"root": str(root), "image_root": "."})
    assert str(refused.value) == (
        "image_root: a label file's setting, which a folder of class folders does not take "
        "(it reads root alone): remove it, or set it null where the dataset's name was "
        "overridden in dataset 'ImageFolderDataset'"
    )
    # a gallery library given as root (the README's `my_gallery` for `my_gallery_photos`):
    # named as one, with what to give; it said only that it had no class subfolders
    library = tmp_path / "my_gallery"
    (library / "uploads").mkdir(parents=True)
    (library / "gallery.sqlite").write_bytes(b"")
    with pytest.raises(DataError) as refused:
        ImageFolderDataset(str(library))
    assert str(refused.value) == (
        f"image folder {library}: a gallery library, not a folder of class folders of photos; "
        "give the folder of photos it was built from (root/<class>/<image>)"
    )
    # "png" in Python was read letter by letter (.p .n .g), and [""] matched no file
    said = "extensions: expected a list of file suffixes, such as ['.jpg', '.png'], got"
    with pytest.raises(ValueError) as refused:
        ImageFolderDataset(str(root), extensions="png")
    assert str(refused.value) == f"{said} 'png'"
    with pytest.raises(ConfigError) as refused:
        registry.DATASETS.build("ImageFolderDataset", root=str(root), extensions=[".png", ""])
    assert str(refused.value) == f"{said} ['.png', ''] in dataset 'ImageFolderDataset'"
    # a pattern is no suffix: `*.jpg` matched no file either
    with pytest.raises(ConfigError) as refused:
        registry.DATASETS.build("ImageFolderDataset", root=str(root), extensions=["*.png"])
    assert str(refused.value) == f"{said} ['*.png'] in dataset 'ImageFolderDataset'"


def test_image_folder_dataset_skips_a_gallery_library_in_its_tree(tmp_path: Path, caplog):
    """A library built inside its photos' folder (`index build photos --out photos/lib`,
    which `index build` allows) was read as one more class, of the images `shitu serve`
    keeps in it, and the class count asked for a head to train on it."""
    from shitu.index import Gallery
    from shitu.inference import FeatureExtractor, default_model_dir

    root = tmp_path / "photos"
    save_png(root / "apple" / "1.png", pattern(40, 40))
    save_png(root / "pear" / "1.png", pattern(40, 40, seed=1))
    with FeatureExtractor.load(default_model_dir()) as extractor:
        Gallery.build(root / "lib", extractor, collect_items([str(root)]))
    save_png(root / "lib" / "uploads" / "2.png", pattern(40, 40, seed=2))  # a served upload
    with caplog.at_level(logging.WARNING):
        dataset = ImageFolderDataset(str(root))
    assert dataset.class_names == ["apple", "pear"] and dataset.labels == [0, 1]
    assert f"(a gallery library x1; e.g. {root / 'lib'})" in caplog.text


def test_a_class_folder_holding_a_folder_named_as_a_library_file_is_a_class(tmp_path: Path):
    """A library is told by its file, as the image scan tells it: a folder of that name
    inside a class folder left the class out of the class list while the scan took its
    images, a KeyError for their class."""
    from shitu.index.metadata import LIBRARY_FILE

    root = tmp_path / "photos"
    save_png(root / "apple" / "1.png", pattern(40, 40))
    save_png(root / "pear" / LIBRARY_FILE / "1.png", pattern(40, 40, seed=1))
    dataset = ImageFolderDataset(str(root))
    assert dataset.class_names == ["apple", "pear"] and dataset.labels == [0, 1]


def test_image_folder_dataset_refuses_a_training_runs_folder_as_a_class(tmp_path: Path):
    """A run's output folder inside the root (a detect-train --out, an earlier run's) was
    read as one more class, an empty one, shifting the ids of the classes after it."""
    root = tmp_path / "photos"
    save_png(root / "apple" / "1.png", pattern(4, 4))
    save_png(root / "pear" / "1.png", pattern(4, 4))
    (root / "output").mkdir()
    (root / "output" / ".shitu-train.lock").write_text("shitu detect-train (process 1)")
    (root / "output" / "latest.pt").write_bytes(b"a checkpoint")
    with pytest.raises(DataError) as caught:
        ImageFolderDataset(str(root))
    assert str(caught.value) == (
        f"image folder {root}: folder(s) output hold a shitu training run's files "
        f"(.shitu-train.lock), not a class's images; move them out of {root}"
    )


def test_image_folder_dataset_grouped_by_category_takes_leaf_folders_as_classes(
    tmp_path: Path, caplog
):
    """The Grocery Store Dataset's `train/Fruit/Apple/Golden-Delicious/`: its first-level
    folders are categories, warned of with the way out, `leaf_labels: true`, which makes
    the folder each image is in its class, as `index build --leaf-labels` labels a gallery."""
    root = tmp_path / "train"
    save_png(root / "Fruit" / "Apple" / "Golden-Delicious" / "1.png", pattern(4, 4))
    save_png(root / "Fruit" / "Pear" / "1.png", pattern(5, 5))
    save_png(root / "Vegetables" / "Leek" / "1.png", pattern(6, 6))
    with caplog.at_level(logging.WARNING, logger="shitu"):
        grouped = registry.DATASETS.build("ImageFolderDataset", root=str(root))
    assert grouped.class_names == ["Fruit", "Vegetables"]
    assert caplog.text.count("set `leaf_labels: true` in its dataset config") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shitu"):
        by_product = registry.DATASETS.build("ImageFolderDataset", root=str(root), leaf_labels=True)
    assert by_product.class_names == ["Golden-Delicious", "Leek", "Pear"]
    assert by_product.num_classes == 3 and by_product.labels == [0, 2, 1]
    assert caplog.messages == []


# ---------------------------------------------------------------- transforms


def test_decode_defaults_to_rgb_pixels_as_a_chw_tensor():
    image = pattern(7, 9)
    out = build_transforms(None)(png_bytes(image))
    assert out.dtype == torch.float32 and out.shape == (3, 7, 9)
    assert np.array_equal(out.numpy(), image.transpose(2, 0, 1).astype(np.float32))
    bgr = build_transforms([{"DecodeImage": {"to_rgb": False}}])(png_bytes(image))
    assert np.array_equal(bgr.numpy(), image[:, :, ::-1].transpose(2, 0, 1))
    grey = np.asarray(Image.fromarray(image).convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    assert build_transforms(None)(buffer.getvalue()).shape == (3, 7, 9)


def test_16_bit_grey_keeps_its_top_8_bits_as_opencv_does():
    levels = np.array([[0, 1000, 20000, 65535]], np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")  # a 16-bit greyscale PNG
    decoded = DecodeImage()(buffer.getvalue())
    assert decoded[..., 0].ravel().tolist() == [0, 3, 78, 255]  # not clipped to white
    assert np.array_equal(decoded, decode_rgb(buffer.getvalue()))  # as inference reads it


def test_a_16_bit_grey_pngs_transparent_level_is_shown_on_white():
    """A 16-bit grey PNG's transparent level (its tRNS) was dropped, where 8-bit grey's
    and 16-bit RGB's are shown on white: a black logo on a transparent background was a
    black square. Level 1 is no transparent 0, though its top 8 bits are."""
    levels = np.zeros((4, 6), np.uint16)  # transparent black around the logo
    levels[1:3, 2:4] = 1  # the logo: opaque, nearly black
    levels[0, 0] = 65535  # opaque white
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG", transparency=0)
    decoded = DecodeImage()(buffer.getvalue())
    expected = np.where(levels == 0, 255, levels >> 8).astype(np.uint8)
    assert np.array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))
    assert np.array_equal(decoded, decode_rgb(buffer.getvalue()))  # as inference reads it


def tiff_bytes(values: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values, mode=mode).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("values", "mode", "expected"),
    [
        # 8-bit levels in a 32-bit integer TIFF (numpy ints saved by Pillow): kept as they are
        (np.array([[0, 10, 128, 255]], np.int32), "I", [0, 10, 128, 255]),
        # 16-bit levels: their top 8 bits, as for a 16-bit PNG
        (np.array([[0, 1000, 20000, 65535]], np.int32), "I", [0, 3, 78, 255]),
        # levels beyond 16 bits (a 24-bit camera, say): scaled by the image's own range
        (np.array([[0, 1 << 20, 1 << 23, (1 << 24) - 1]], np.int32), "I", [0, 15, 127, 255]),
        (np.array([[-5, 0, 128, 255]], np.int32), "I", [0, 0, 128, 255]),  # below 0: black
        # floats of 0..1, as image libraries store them; 0..255 kept as they are
        (np.array([[0.0, 0.25, 0.5, 1.0]], np.float32), "F", [0, 64, 128, 255]),
        (np.array([[0.0, 10.0, 128.4, 255.0]], np.float32), "F", [0, 10, 128, 255]),
        (np.array([[np.nan, 0.0, 0.5, 1.0]], np.float32), "F", [0, 0, 128, 255]),
    ],
)
def test_32_bit_and_float_grey_are_scaled_to_8_bits_by_the_range_their_levels_fill(
    values, mode, expected
):
    """Pillow's modes I and F do not say the bit depth of their levels: 8-bit levels were
    shifted to black, anything beyond 16 bits clipped to white, 0..1 floats made black."""
    data = tiff_bytes(values, mode)
    decoded = DecodeImage()(data)
    assert decoded[..., 0].ravel().tolist() == expected
    assert np.array_equal(decoded[..., 0], decoded[..., 2])
    assert np.array_equal(decoded, decode_rgb(data))  # as inference reads it


def test_cmyk_jpegs_decode_in_inference_as_training_decodes_them():
    """OpenCV's CMYK conversion rounds otherwise than Pillow's (one level off on nearly
    every pixel): inference must give training's pixels, also with an EXIF block and a
    colour profile before the frame header."""
    image = Image.fromarray(pattern(16, 24)).convert("CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated, which both decoders apply
    variants = {"plain": {}, "EXIF and profile": {"exif": exif, "icc_profile": bytes(70_000)}}
    for name, options in variants.items():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95, **options)
        assert is_cmyk_jpeg(buffer.getvalue()), name
        assert np.array_equal(decode_rgb(buffer.getvalue()), DecodeImage()(buffer.getvalue())), name
    assert not is_cmyk_jpeg(png_bytes(pattern(4, 4)))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    assert not is_cmyk_jpeg(buffer.getvalue())


def test_transparent_parts_are_decoded_as_white_not_as_the_colour_stored_under_them():
    """A black logo on a transparent background (stored as transparent black, as editors
    save it) must stay a black logo on white, not become a black square: in training's
    decoder and in inference's (OpenCV's, which drops the alpha) alike."""
    logo = np.zeros((4, 6, 4), np.uint8)  # RGBA: everything black, transparent
    logo[1:3, 2:4, 3] = 255  # the logo: opaque black
    logo[0, 0] = (0, 0, 0, 128)  # half transparent black: grey
    rgba = Image.fromarray(logo)
    variants = {
        "RGBA PNG": (rgba, "PNG", {}),
        "palette PNG with a transparent entry": (rgba.quantize(4), "PNG", {}),
        "grey + alpha PNG": (rgba.convert("LA"), "PNG", {}),
        "lossless WebP": (rgba, "WEBP", {"lossless": True}),
        "lossy WebP with alpha": (rgba, "WEBP", {"quality": 100, "alpha_quality": 100}),
        "GIF with a transparent colour": (rgba, "GIF", {}),
        "RGBA TIFF": (rgba, "TIFF", {}),
    }
    if features.check("avif"):  # Pillow 11.3 and later
        variants["AVIF with alpha"] = (rgba, "AVIF", {"quality": 100})
    for name, (image, file_format, options) in variants.items():
        buffer = io.BytesIO()
        image.save(buffer, format=file_format, **options)
        decoded = DecodeImage()(buffer.getvalue())
        assert decoded.shape == (4, 6, 3), name
        assert (decoded[3] > 245).all() and (decoded[1:3, 2:4] < 10).all(), name
        assert np.array_equal(decoded, decode_rgb(buffer.getvalue())), name  # as inference
    assert abs(int(DecodeImage()(png_bytes(logo))[0, 0, 0]) - 127) <= 1  # half: grey
    # A 32-bit BMP whose fourth byte is alpha (a BITMAPV4HEADER's mask, as Windows tools
    # write one; Pillow saves none): OpenCV read it as the black square.
    pixels = logo[::-1, :, [2, 1, 0, 3]].tobytes()  # bottom-up BGRA
    header = struct.pack("<IiiHHIIiiII", 108, 6, 4, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    header += struct.pack("<IIII", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"BGRs" + bytes(48)
    bmp = b"BM" + struct.pack("<IHHI", 14 + 108 + len(pixels), 0, 0, 14 + 108) + header + pixels
    decoded = DecodeImage()(bmp)
    assert (decoded[3] > 245).all() and (decoded[1:3, 2:4] < 10).all()
    assert np.array_equal(decoded, decode_rgb(bmp))
    # A palette PNG's transparent entry after 100 KB of metadata (an editor's XMP, say)
    buffer = io.BytesIO()
    rgba.quantize(4).save(buffer, format="PNG")
    body = b"XML:com.adobe.xmp\x00" + b" " * 100_000
    crc = zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
    metadata = len(body).to_bytes(4, "big") + b"tEXt" + body + crc
    png = buffer.getvalue()[:33] + metadata + buffer.getvalue()[33:]  # after the IHDR chunk
    assert (decode_rgb(png)[3] > 245).all() and np.array_equal(decode_rgb(png), DecodeImage()(png))


def test_paddleclas_only_transform_keys_are_accepted():
    """PP-ShiTuV2's own configs set these; they change nothing here."""
    image = pattern(7, 9)
    paddle = build_transforms(
        [
            {"DecodeImage": {"to_rgb": True, "channel_first": False}},
            {"ResizeImage": {"size": [8, 6], "return_numpy": False}},
            {"Pad": {"padding": 1, "backend": "cv2"}},
            {"NormalizeImage": {"scale": "1.0/255.0", "output_fp16": False, "channel_num": 3}},
        ]
    )(png_bytes(image))
    plain = build_transforms(
        [
            {"DecodeImage": {"to_rgb": True, "channel_first": False}},
            {"ResizeImage": {"size": [8, 6]}},
            {"Pad": {"padding": 1}},
            {"NormalizeImage": {"scale": "1.0/255.0"}},
        ]
    )(png_bytes(image))
    assert torch.equal(paddle, plain)
    with pytest.raises(ConfigError, match="channel_num"):
        build_transforms([{"DecodeImage": {}}, {"NormalizeImage": {"channel_num": 4}}])


def test_decode_applies_exif_orientation():
    image = pattern(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", exif=exif, quality=95)
    assert build_transforms(None)(buffer.getvalue()).shape == (3, 10, 6)


def test_decode_treats_arrays_as_pillow_reads_them_and_refuses_what_is_no_image():
    image = pattern(5, 6)
    decode = DecodeImage()
    assert np.array_equal(decode(image), image)
    assert np.array_equal(DecodeImage(to_rgb=False)(image), image[:, :, ::-1])  # as for files
    grey = np.asarray(Image.fromarray(image).convert("L"))
    assert np.array_equal(decode(grey), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.concatenate([image, np.full((5, 6, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(decode(rgba), image)
    with pytest.raises(DataError, match=r"complex128 array of shape \(5, 6\)"):
        decode(np.zeros((5, 6), np.complex128))


def test_pil_resize_defaults_and_codes_are_pillows_as_in_paddleclas():
    """PaddleClas hands `interpolation` to Pillow as it is: left out, Pillow's default
    (bicubic); integers are Pillow's codes (2 bilinear, 3 bicubic), not OpenCV's."""
    image = pattern(40, 30)
    pillow_default = np.asarray(Image.fromarray(image).resize((11, 9)))
    assert np.array_equal(ResizeImage(size=[11, 9], backend="pil")(image), pillow_default)
    assert ResizeImage(size=8, interpolation=2, backend="pil").interpolation == "bilinear"
    assert ResizeImage(size=8, interpolation=2).interpolation == "bicubic"  # cv2.INTER_CUBIC
    assert ResizeImage(size=8).interpolation == "bilinear"


def test_resize_short_refuses_an_image_it_would_blow_up(monkeypatch):
    """A thin image grown to resize_short could take gigabytes: past the pixel limit
    (lowered here, to keep the test small) it is refused, naming its size."""
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", "0.01")
    assert run_op("ResizeImage", pattern(50, 100), resize_short=40).shape == (40, 80, 3)
    with pytest.raises(DataError, match=r"ResizeImage: image 400x2 .* makes 4000x20 pixels"):
        pipeline_output([{"ResizeImage": {"resize_short": 20}}], pattern(2, 400))
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", "1")
    assert run_op("ResizeImage", pattern(2, 400), resize_short=20).shape == (20, 4000, 3)


def test_an_output_size_over_the_pixel_limit_is_refused_as_the_config_loads():
    """`size: 22400` (a typo of 224) made every image 500 megapixels, gigabytes each, when
    first loaded: refused by name, for each op that sizes its output."""
    for name in ("ResizeImage", "RandCropImage", "CropImage", "RandCropImageV2"):
        with pytest.raises(ConfigError) as refused:
            build_transforms([{name: {"size": 22400}}])
        assert str(refused.value) == (
            "transform_ops[0]: size: 22400x22400 is 501.8 megapixels, over the limit of 250 "
            f"megapixels (SHITU_MAX_MEGAPIXELS) in transform '{name}'"
        )
    # a short side of 22400 makes at least 22400x22400: each image was refused as elongated
    with pytest.raises(ConfigError, match=r"^transform_ops\[0\]: resize_short: 22400x22400 is "):
        build_transforms([{"ResizeImage": {"resize_short": 22400}}])
    resize = build_transforms([{"ResizeImage": {"size": [15000, 15000]}}]).ops[1]
    assert resize.size == (15000, 15000)  # 225 megapixels: within it


def test_channel_first_decode_with_chw_normalise():
    image = pattern(5, 6)
    out = pipeline_output(
        [{"DecodeImage": {"channel_first": True}}, {"NormalizeImage": {"order": "chw"}}], image
    )
    expected = (image.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_resize_sizes_and_interpolations():
    image = pattern(30, 40)
    assert run_op("ResizeImage", image, size=[20, 10]).shape == (10, 20, 3)
    assert run_op("ResizeImage", image, size=16).shape == (16, 16, 3)
    assert run_op("ResizeImage", image, resize_short=15).shape == (15, 20, 3)
    for backend in ("cv2", "pil"):
        for name in ("nearest", "bilinear", "bicubic", "area", "lanczos"):
            out = run_op("ResizeImage", image, size=[13, 11], interpolation=name, backend=backend)
            assert out.shape == (11, 13, 3) and out.dtype == np.uint8
    # OpenCV's bilinear halving (half-pixel centres, no antialiasing) averages 2x2 blocks.
    half = run_op("ResizeImage", image, size=[20, 15], interpolation="bilinear")
    blocks = image.reshape(15, 2, 20, 2, 3).astype(np.float32).mean(axis=(1, 3))
    assert np.abs(half.astype(np.float32) - blocks).max() <= 0.5
    # Area at a scale that is not a whole number: exactly what inference does (OpenCV).
    area = run_op("ResizeImage", image, size=[13, 11], interpolation="area")
    assert np.array_equal(area, cv2.resize(image, (13, 11), interpolation=cv2.INTER_AREA))
    # Nearest keeps original pixel values: every second pixel when halving.
    nearest = run_op("ResizeImage", image, size=[20, 15], interpolation="nearest")
    assert np.array_equal(nearest, image[::2, ::2])
    # 480 -> 224 wide puts column 119 on source 255 exactly, where float32 rounding of the
    # scale picked another pixel than OpenCV (and inference) does.
    wide = pattern(6, 480)
    nearest = run_op("ResizeImage", wide, size=[224, 3], interpolation="nearest")
    assert np.array_equal(nearest, cv2.resize(wide, (224, 3), interpolation=cv2.INTER_NEAREST))
    with pytest.raises(
        ConfigError,
        match="size: required unless resize_short is above 0 in transform 'ResizeImage'",
    ):
        build_transforms([{"ResizeImage": {}}])
    # Both: PaddleClas takes resize_short without a word, and a fixed size is lost.
    with pytest.raises(
        ConfigError,
        match=r"^transform_ops\[0\]: resize_short: 256 given with size 224, which resize diff",
    ):
        build_transforms([{"ResizeImage": {"size": 224, "resize_short": 256}}])
    with pytest.raises(ConfigError, match="interpolation: unknown name 'cubic'"):
        build_transforms([{"ResizeImage": {"size": 4, "interpolation": "cubic"}}])


def test_flip_really_flips():
    image = pattern(6, 8)
    for code, flipped in ((1, image[:, ::-1]), (0, image[::-1]), (-1, image[::-1, ::-1])):
        seen = set()
        for seed in range(20):
            torch.manual_seed(seed)
            out = run_op("RandFlipImage", image, flip_code=code)
            if np.array_equal(out, image):
                seen.add("same")
            else:
                assert np.array_equal(out, flipped)
                seen.add("flipped")
        assert seen == {"same", "flipped"}


def test_pad_sides_fill_and_modes():
    image = pattern(4, 5)
    out = run_op("Pad", image, padding=2, fill=7)
    assert out.shape == (8, 9, 3)
    assert np.array_equal(out[2:6, 2:7], image)
    assert (out[:2] == 7).all() and (out[:, :2] == 7).all() and (out[6:] == 7).all()
    out = run_op("Pad", image, padding=[1, 2, 3, 4], fill=[1, 2, 3])
    assert out.shape == (4 + 2 + 4, 5 + 1 + 3, 3)
    assert np.array_equal(out[2:6, 1:6], image)
    assert out[0, 0].tolist() == [1, 2, 3]
    reflect = run_op("Pad", image, padding=[1, 0], padding_mode="reflect")
    assert np.array_equal(reflect[:, 0], image[:, 1])


@pytest.mark.parametrize("op", ["Pad", "RandomRotation"])
@pytest.mark.parametrize("fill", [300, -1, [1, 2], [0, 0, 256]])
def test_fill_outside_one_level_or_one_per_channel_is_a_config_error(op, fill):
    """Refused when the pipeline is built: it failed on every image (OverflowError, a
    broadcast error, Pillow's TypeError) or wrapped around."""
    params = {"padding": 2} if op == "Pad" else {"degrees": 30, "prob": 1.0}
    with pytest.raises(
        ConfigError, match=rf"transform_ops\[0\]: fill: give one level.* in transform '{op}'"
    ):
        build_transforms([{op: {**params, "fill": fill}}])


def test_rotation():
    image = pattern(8, 8)
    assert np.array_equal(run_op("RandomRotation", image, degrees=90, prob=0.0), image)
    quarter = run_op("RandomRotation", image, degrees=[90, 90], prob=1.0)
    assert np.array_equal(quarter, np.rot90(image))  # counter-clockwise
    torch.manual_seed(0)
    tilted = run_op(
        "RandomRotation", np.full((20, 20, 3), 200, np.uint8), degrees=[30, 40], prob=1.0, fill=9
    )
    assert tilted.shape == (20, 20, 3)
    assert tilted[0, 0].tolist() == [9, 9, 9] and tilted[10, 10].tolist() == [200, 200, 200]
    flips = sum(
        not np.array_equal(run_op("RandomRotation", image, degrees=45, prob=0.5), image)
        for _ in range(200)
    )
    assert 70 < flips < 130


def test_random_resized_crop():
    image = pattern(60, 80)
    for seed in range(10):
        torch.manual_seed(seed)
        assert run_op("RandCropImage", image, size=[40, 30]).shape == (30, 40, 3)
    # Full scale at the image's own aspect ratio is a plain resize of the whole image.
    square = pattern(32, 32)
    full = run_op("RandCropImage", square, size=16, scale=[1.0, 1.0], ratio=[1.0, 1.0])
    assert np.array_equal(full, run_op("ResizeImage", square, size=16))
    with pytest.raises(ConfigError, match="scale: give \\[low, high\\]"):
        build_transforms([{"RandCropImage": {"size": 4, "scale": [0.5, 0.1]}}])


def test_crops_cut_windows_of_the_input():
    image = pattern(20, 30)
    centre = run_op("CropImage", image, size=[10, 6])
    assert np.array_equal(centre, image[7:13, 10:20])
    offsets = set()
    for seed in range(30):
        torch.manual_seed(seed)
        crop = run_op("RandCropImageV2", image, size=[24, 16])
        assert crop.shape == (16, 24, 3)
        windows = [
            (top, left)
            for top in range(5)
            for left in range(7)
            if np.array_equal(image[top : top + 16, left : left + 24], crop)
        ]
        assert len(windows) == 1
        offsets.add(windows[0])
    assert len(offsets) > 10  # positions vary, edges included
    exact = run_op("RandCropImageV2", image, size=[30, 20])
    assert np.array_equal(exact, image)


def test_color_jitter():
    image = pattern(10, 10) // 2
    brighter = run_op("ColorJitter", image, brightness=[2.0, 2.0])
    assert np.abs(brighter.astype(int) - 2 * image.astype(int)).max() <= 1
    grey = run_op("ColorJitter", image, saturation=[0.0, 0.0])
    assert (grey[:, :, 0] == grey[:, :, 1]).all() and (grey[:, :, 1] == grey[:, :, 2]).all()
    assert np.array_equal(run_op("ColorJitter", image, brightness=0.5, prob=0.0), image)
    hue = run_op("ColorJitter", pattern(10, 10), hue=[0.5, 0.5])
    assert not np.array_equal(hue, pattern(10, 10))
    with pytest.raises(ConfigError, match="hue: shifts must lie in"):
        build_transforms([{"ColorJitter": {"hue": 0.7}}])


@pytest.mark.parametrize(
    ("op", "params", "message"),
    [
        ("RandomRotation", {"degrees": 30, "prob": 50}, "prob: a probability in [0, 1], got 50"),
        ("ColorJitter", {"brightness": 0.2, "prob": -1}, "prob: a probability in [0, 1]"),
        ("ColorJitter", {"contrast": [-0.5, 1.5]}, "contrast: factors must not be negative"),
        ("ColorJitter", {"saturation": [-1, 0]}, "saturation: factors must not be negative"),
    ],
)
def test_probabilities_and_jitter_factors_out_of_range_are_config_errors(op, params, message):
    """Once applied always or never, or an inverted image, without a word."""
    with pytest.raises(
        ConfigError, match=re.escape(f"transform_ops[0]: {message}") + f".* in transform '{op}'"
    ):
        build_transforms([{op: params}])


def test_random_erasing_fills_one_rectangle_after_normalising():
    normalise = {"NormalizeImage": {"scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}}
    image = np.full((40, 50, 3), 200, np.uint8)
    for layout in ([], [{"ToCHWImage": None}]):
        for seed in range(20):
            torch.manual_seed(seed)
            erase = {"RandomErasing": {"EPSILON": 1.0, "sl": 0.1, "sh": 0.3, "mean": [1, 2, 3]}}
            out = pipeline_output([*layout, normalise, erase], image).numpy()
            erased = out[0] != 200
            rows, cols = np.nonzero(erased)
            box = erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()  # one solid rectangle, nothing outside it
            assert 0.1 * 2000 * 0.9 <= box.size <= 0.3 * 2000 * 1.1
            for channel, value in enumerate([1, 2, 3]):
                assert (out[channel][erased] == value).all() and (
                    out[channel][~erased] == 200
                ).all()
    never = {"RandomErasing": {"EPSILON": 0.0}}
    assert (pipeline_output([normalise, never], image).numpy() == 200).all()
    torch.manual_seed(0)
    noise = {"RandomErasing": {"EPSILON": 1.0, "mode": "pixel"}}
    assert len(np.unique(pipeline_output([normalise, noise], image).numpy())) > 100
    with pytest.raises(ConfigError, match="RandomErasing: erases normalised values"):
        build_transforms([{"RandomErasing": {}}, normalise])
    with pytest.raises(ConfigError, match="sh: the largest area fraction"):
        build_transforms([normalise, {"RandomErasing": {"sl": 0.5, "sh": 0.2}}])


def test_normalise_values_and_scale_strings():
    image = pattern(4, 5)
    expected = (image.astype(np.float32) * np.float32(1 / 255) - np.float32(MEAN)) / np.float32(STD)
    for scale in ("1.0/255.0", 0.00392156862745098, "1/255"):
        out = pipeline_output(
            [{"NormalizeImage": {"scale": scale, "mean": MEAN, "std": STD, "order": "hwc"}}], image
        )
        np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    chw = pipeline_output([{"ToCHWImage": None}, {"NormalizeImage": {"order": "chw"}}], image)
    np.testing.assert_allclose(chw.numpy(), expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    plain = pipeline_output(
        [{"NormalizeImage": {"scale": 2, "mean": [0, 0, 0], "std": [1, 1, 1]}}], image
    )
    assert np.array_equal(plain.numpy(), 2 * image.transpose(2, 0, 1).astype(np.float32))
    # ImageNet's 0-1 mean and std with `scale: 1` (the /255 left out): values in the hundreds
    with pytest.raises(ConfigError) as refused:
        build_transforms([{"NormalizeImage": {"scale": 1.0, "mean": MEAN, "std": STD}}])
    assert str(refused.value) == (
        f"transform_ops[0]: scale: 1 leaves pixels in [0, 255], but mean {MEAN} and std {STD} "
        "are those of pixels in [0, 1], so normalised images reach values in the hundreds; "
        "set scale: 1.0/255.0 in transform 'NormalizeImage'"
    )
    with pytest.raises(
        ConfigError, match=r"transform_ops\[0\]: scale: write a finite number or 'a/b'"
    ):
        build_transforms([{"NormalizeImage": {"scale": "__import__('os')"}}])


def test_to_chw_is_optional():
    image = pattern(5, 7)
    with_op = pipeline_output([{"ToCHWImage": {}}], image)
    without = pipeline_output([], image)
    assert with_op.shape == (3, 5, 7) and torch.equal(with_op, without)


TRAIN_OPS = [
    {"DecodeImage": {"to_rgb": True, "channel_first": False}},
    {"ResizeImage": {"size": [40, 40], "interpolation": "bilinear"}},
    {"RandFlipImage": {"flip_code": 1}},
    {"Pad": {"padding": 4}},
    {"RandCropImageV2": {"size": [40, 40]}},
    {"RandomRotation": {"prob": 0.5, "degrees": 90, "interpolation": "bilinear"}},
    {"ColorJitter": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1}},
    {"RandCropImage": {"size": 32}},
    {"NormalizeImage": {"scale": 0.00392157, "mean": MEAN, "std": STD, "order": "hwc"}},
    {"RandomErasing": {"EPSILON": 0.5, "mode": "rand"}},
]


def test_augmentations_are_reproducible_from_the_torch_seed():
    pipeline = build_transforms(TRAIN_OPS)
    data = png_bytes(pattern(50, 60))
    torch.manual_seed(123)
    random.seed(1)
    first = pipeline(data)
    torch.manual_seed(123)
    random.seed(2)  # Python's RNG plays no part
    second = pipeline(data)
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, second)
    outputs = []
    for seed in range(5):
        torch.manual_seed(seed)
        outputs.append(pipeline(data))
    assert all(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_build_transforms_errors_name_op_and_key():
    with pytest.raises(
        ConfigError,
        match=r"transform_ops\[1\]: unknown transform 'ResizeImg' \(did you mean 'ResizeImage'\?\)",
    ):
        build_transforms([{"DecodeImage": {}}, {"ResizeImg": {"size": 3}}])
    with pytest.raises(
        ConfigError,
        match=r"transform_ops\[0\]: sise: unknown key \(did you mean 'size'\?\) in transform 'ResizeImage'",
    ):
        build_transforms([{"ResizeImage": {"sise": 3}}])
    with pytest.raises(
        ConfigError, match=r"transform_ops\[0\]: flip_code: .* in transform 'RandFlipImage'"
    ):
        build_transforms([{"RandFlipImage": {"flip_code": 2}}])
    with pytest.raises(ConfigError, match=r"transform_ops\[0\]: .*one-key mapping"):
        build_transforms([{"ResizeImage": {"size": 3}, "Pad": {"padding": 1}}])
    with pytest.raises(ConfigError) as refused:  # not "[0]: ..., got 'ResizeImage'"
        build_transforms({"ResizeImage": {"size": 3}})
    assert str(refused.value) == (
        "transform_ops: expected a list of ops like [{ResizeImage: {size: 224}}], got dict "
        "{'ResizeImage': {'size': 3}}"
    )
    with pytest.raises(
        ConfigError, match=r"transform_ops\[1\] ResizeImage: .*before NormalizeImage"
    ):
        build_transforms([{"NormalizeImage": {}}, {"ResizeImage": {"size": 3}}])
    with pytest.raises(ConfigError, match=r"transform_ops\[1\] DecodeImage: .*must come first"):
        build_transforms([{"ResizeImage": {"size": 3}}, {"DecodeImage": {}}])
    with pytest.raises(
        ConfigError, match=r"transform_ops\[0\] NormalizeImage: order is 'chw' but the image is HWC"
    ):
        build_transforms([{"NormalizeImage": {"order": "chw"}}])
    with pytest.raises(ConfigError, match=r"transform_ops\[1\] Pad: works on HWC images"):
        build_transforms([{"ToCHWImage": None}, {"Pad": {"padding": 2}}])
    # Found when the pipeline is built, not as an error about the first image loaded.
    with pytest.raises(
        ConfigError,
        match=r"transform_ops\[0\]: mean: needs one value per channel \(3\), got \[0\.5\] in",
    ):
        build_transforms([{"NormalizeImage": {"mean": [0.5], "std": [0.5]}}])


# ---------------------------------------------------------------- PKSampler


SIZES = [1, 2, 3, 5, 8, 13, 4, 4, 6, 2]  # class c has SIZES[c] images


def skewed_labels(sizes: list[int]) -> list[int]:
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    random.Random(0).shuffle(labels)
    return labels


def pk(labels: list[int], **params) -> PKSampler:
    runtime = {key: params.pop(key) for key in ("num_replicas", "rank", "seed") if key in params}
    runtime.setdefault("num_replicas", 1)
    runtime.setdefault("rank", 0)
    return registry.SAMPLERS.build_with_runtime(
        "PKSampler", params, dataset=Labels(labels), **runtime
    )


def test_pk_batches_hold_p_classes_of_k_images():
    labels = skewed_labels(SIZES)
    sampler = pk(labels, batch_size=12, sample_per_id=3, drop_last=False)
    assert len(sampler) == math.ceil(len(labels) / 12)
    repeats = 0
    for _ in range(20):
        sampler.set_epoch(_)
        for batch in sampler:
            assert len(batch) == 12
            classes = [labels[i] for i in batch]
            assert [classes[i] for i in range(0, 12, 3)] == [classes[i] for i in range(2, 12, 3)]
            counts = Counter(classes)
            assert len(counts) == 4 and set(counts.values()) == {3}
            for start in range(0, 12, 3):
                group = batch[start : start + 3]
                if SIZES[labels[group[0]]] >= 3:
                    assert len(set(group)) == 3  # no repeats when the class has enough images
                else:
                    repeats += len(set(group)) < 3
    assert repeats > 0  # small classes are drawn with replacement


def test_pk_warns_of_classes_with_fewer_images_than_k(caplog):
    """Their images are repeated to fill a batch: the warning names them (by class name
    where the dataset has names), leaves out classes never drawn, and comes from rank 0."""
    labels = skewed_labels(SIZES)
    named = Labels(labels)
    named.label_keys = [f"class{c}" for c in range(len(SIZES))]
    with caplog.at_level(logging.WARNING, logger="shitu"):
        pk(labels, batch_size=12, sample_per_id=3)
        registry.SAMPLERS.build_with_runtime(
            "PKSampler", {"batch_size": 12, "sample_per_id": 3}, dataset=named
        )
        pk(labels, batch_size=4, sample_per_id=2, id_list=[0, 0], ratio=[0.0])  # class 0: 1
        pk(labels, batch_size=12, sample_per_id=3, num_replicas=2, rank=1)
    effect = (
        "a batch repeats their images (each copy augmented anew) to fill its 3 places for each, "
        "so their pairs show less variety; add photos of them, or lower sample_per_id"
    )
    assert [record.getMessage() for record in caplog.records] == [
        f"PKSampler: 3 of 10 classes have fewer images than sample_per_id 3 (0 has 1, 1 has 2, "
        f"9 has 2): {effect}",
        "PKSampler: 3 of 10 classes have fewer images than sample_per_id 3 (class0 has 1, "
        f"class1 has 2, class9 has 2): {effect}",
    ]


def test_pk_names_a_grocery_listings_small_classes(grocery: Path, caplog):
    """A Grocery listing numbers its classes by the ids it lists and names them in
    class_names: the warning names them, not their ids."""
    dataset = GroceryStoreDataset(str(grocery), str(grocery / "val.txt"))
    with caplog.at_level(logging.WARNING, logger="shitu"):
        PKSampler(dataset, batch_size=12, sample_per_id=6)
    assert (
        "classes have fewer images than sample_per_id 6 (Pink-Lady has 5, Royal-Gala has 5,"
        in caplog.text
    )


def test_pk_config_errors():
    labels = skewed_labels(SIZES)
    with pytest.raises(
        ConfigError,
        match=r"^batch_size: 10 is not a multiple of sample_per_id \(4\) in sampler 'PKSampler'$",
    ):
        pk(labels, batch_size=10, sample_per_id=4)
    # the key to change is named: sample_per_id itself, not batch_size, where it is the one off
    with pytest.raises(
        ConfigError, match=r"^sample_per_id: 8 images of a class do not fit in a batch of batch_"
    ):
        pk(labels, batch_size=4, sample_per_id=8)
    with pytest.raises(ConfigError, match="needs 12 distinct classes .* has 10"):
        pk(labels, batch_size=24, sample_per_id=2)
    # classes id_list's ratio 0 leaves out are named as the reason
    with pytest.raises(ConfigError, match=r"has 2 that can be drawn \(ratio 0 leaves out 8 of its"):
        pk(labels, batch_size=6, sample_per_id=2, id_list=[0, 7], ratio=[0.0])
    with pytest.raises(
        ConfigError, match="sample_method: Input should be 'sample_avg_prob' or 'id_avg_prob'"
    ):
        pk(labels, batch_size=4, sample_per_id=2, sample_method="uniform")
    with pytest.raises(ConfigError, match="^id_list: holds .* in sampler 'PKSampler'$"):
        pk(labels, batch_size=4, sample_per_id=2, id_list=[0, 3, 5], ratio=[2.0])
    with pytest.raises(ConfigError, match="ratio.0: Input should be greater than or equal to 0"):
        pk(labels, batch_size=4, sample_per_id=2, id_list=[0, 3], ratio=[-2.0])
    # a range written backwards holds no class: its ratio would never apply
    with pytest.raises(
        ConfigError, match=r"^id_list: the range \[3, 0\] is backwards .* write it \[0, 3\]"
    ):
        pk(labels, batch_size=4, sample_per_id=2, id_list=[0, 0, 3, 0], ratio=[1.0, 2.0])


def test_pk_is_deterministic_per_epoch_and_resumable():
    labels = skewed_labels([7] * 30)
    sampler = pk(labels, batch_size=8, sample_per_id=2, seed=5)
    first = list(sampler)
    assert len(first) == len(labels) // 8
    assert list(pk(labels, batch_size=8, sample_per_id=2, seed=5)) == first
    assert list(pk(labels, batch_size=8, sample_per_id=2, seed=6)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    sampler.set_epoch(1, start_batch=10)
    assert list(sampler) == second[10:]
    assert list(sampler) == second[10:]  # stays until the next set_epoch
    sampler.set_epoch(0)
    assert list(sampler) == first
    with pytest.raises(ValueError, match="start_batch 99 is outside"):
        sampler.set_epoch(0, start_batch=99)


def test_pk_ranks_share_the_epoch_evenly():
    labels = skewed_labels([5] * 40)  # 200 images
    single = pk(labels, batch_size=8, sample_per_id=2, seed=3, drop_last=False)
    ranks = [
        pk(labels, batch_size=8, sample_per_id=2, seed=3, drop_last=False, num_replicas=2, rank=r)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(100 / 8) == 13
    batches = [list(r) for r in ranks]
    assert all(len(b) == 8 for rank in batches for b in rank)
    assert all(a != b for a, b in zip(*batches, strict=True))
    # One process with the same seed draws the ranks' batches interleaved.
    interleaved = [batch for pair in zip(*batches, strict=True) for batch in pair]
    assert len(single) == 25 and list(single) == interleaved[:25]
    ranks[1].set_epoch(4, start_batch=7)
    tail = list(ranks[1])
    ranks[1].set_epoch(4)
    assert list(ranks[1])[7:] == tail


def class_frequencies(sampler: PKSampler, labels: list[int], epochs: int) -> Counter:
    seen: Counter = Counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            seen.update({labels[i] for i in batch})
    return seen


def test_pk_sampling_probabilities():
    sizes = [100] + [2] * 9
    labels = skewed_labels(sizes)  # 118 images, 29 batches of 4 per epoch
    by_id = pk(labels, batch_size=4, sample_per_id=2, sample_method="id_avg_prob")
    by_sample = pk(labels, batch_size=4, sample_per_id=2, sample_method="sample_avg_prob")
    batches = 29 * 40
    id_rate = class_frequencies(by_id, labels, 40)[0] / batches
    sample_rate = class_frequencies(by_sample, labels, 40)[0] / batches
    assert abs(id_rate - 0.2) < 0.04  # 2 of 10 classes, uniformly
    assert sample_rate > 0.95  # 100 of 118 images: nearly every batch
    # PaddleClas's id_list/ratio: class 0 never, classes 1..2 five times as often as the rest.
    weighted = pk(
        labels,
        batch_size=4,
        sample_per_id=2,
        sample_method="id_avg_prob",
        id_list=[0, 0, 1, 2],
        ratio=[0.0, 5.0],
    )
    seen = class_frequencies(weighted, labels, 40)
    assert seen[0] == 0
    assert seen[1] > 2.5 * seen[5] and seen[2] > 2.5 * seen[6]


# ---------------------------------------------------------------- DistributedBatchSampler


def dbs(size: int, **params) -> DistributedBatchSampler:
    runtime = {key: params.pop(key) for key in ("num_replicas", "rank", "seed") if key in params}
    return registry.SAMPLERS.build_with_runtime(
        "DistributedBatchSampler", params, dataset=range(size), **runtime
    )


def test_distributed_sampler_covers_every_index_once_plus_padding():
    world = 3
    samplers = [dbs(10, batch_size=2, num_replicas=world, rank=r) for r in range(world)]
    assert {len(s) for s in samplers} == {2}
    shares = [[i for batch in sampler for i in batch] for sampler in samplers]
    assert [len(share) for share in shares] == [s.num_samples for s in samplers] == [4, 4, 4]
    assert samplers[0].num_padding == 2
    # every index once, plus the padding, which repeats the order from the start
    assert sorted(i for share in shares for i in share) == sorted([*range(10), 0, 1])
    assert list(samplers[1]) == [[1, 4], [7, 0]]  # strided shares


def test_distributed_sampler_shuffle_drop_last_and_resume():
    plain = dbs(10, batch_size=4)
    assert list(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plain.num_padding == 0
    dropping = dbs(11, batch_size=2, drop_last=True, num_replicas=2, rank=1)
    assert list(dropping) == [[1, 3], [5, 7]] and dropping.num_padding == 0
    shuffled = [
        dbs(50, batch_size=8, shuffle=True, seed=1, num_replicas=2, rank=r) for r in range(2)
    ]
    epoch0 = [list(s) for s in shuffled]
    covered = sorted(i for rank in epoch0 for b in rank for i in b)
    assert covered == list(range(50))
    assert epoch0[0] == list(dbs(50, batch_size=8, shuffle=True, seed=1, num_replicas=2, rank=0))
    shuffled[0].set_epoch(1)
    epoch1 = list(shuffled[0])
    assert epoch1 != epoch0[0]
    shuffled[0].set_epoch(1, start_batch=2)
    assert list(shuffled[0]) == epoch1[2:]
    assert len(dbs(0, batch_size=4)) == 0 and list(dbs(0, batch_size=4)) == []


# ---------------------------------------------------------------- DataLoader


def test_training_in_listing_order_is_warned_of(grocery: Path, caplog):
    """A DistributedBatchSampler trains on the images as listed unless shuffled: a Grocery
    list, sorted by class, gives batches of one class or two, every epoch alike."""
    dataset = {"name": "GroceryStoreDataset", "image_root": str(grocery),
               "cls_label_path": str(grocery / "val.txt")}  # fmt: skip
    for shuffle in (False, True):
        train = DataSplitConfig.model_validate(
            {
                "dataset": dataset,
                "sampler": {"name": "DistributedBatchSampler", "batch_size": 8, "shuffle": shuffle},
                "loader": {"num_workers": 0},
            }
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shitu"):
            build_train_loader(train, init_distributed("cpu"), seed=0)
        said = "DataLoader.Train.sampler: shuffle is false, so every epoch trains on the images"
        assert (said in caplog.text) is not shuffle


def test_dataloader_with_workers_on_real_images(grocery: Path):
    dataset = {
        "name": "GroceryStoreDataset",
        "image_root": str(grocery),
        "cls_label_path": str(grocery / "val.txt"),
        "transform_ops": [
            {"DecodeImage": {"to_rgb": True, "channel_first": False}},
            {"ResizeImage": {"size": 48}},
            {"RandFlipImage": {"flip_code": 1}},
            {"NormalizeImage": {"scale": "1.0/255.0", "mean": MEAN, "std": STD, "order": "hwc"}},
        ],
    }
    train = DataSplitConfig.model_validate(
        {
            "dataset": dataset,
            "sampler": {"name": "PKSampler", "batch_size": 8, "sample_per_id": 2},
            "loader": {"num_workers": 2},
        }
    )
    loader = build_train_loader(train, init_distributed("cpu"), seed=7)
    assert len(loader) == 296 // 8
    for step, (images, labels, ids, _) in enumerate(loader):
        assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32
        assert labels.shape == ids.shape == (8,)
        assert set(Counter(labels.tolist()).values()) == {2}
        if step == 2:
            break
    evaluation = DataSplitConfig.model_validate({"dataset": dataset, "loader": {"num_workers": 0}})
    loader = build_eval_loader(
        evaluation, init_distributed("cpu"), seed=0, where="DataLoader.Eval.Query"
    )
    assert len(loader) == math.ceil(296 / 64)
    images, labels, ids, _ = next(iter(loader))
    assert images.shape == (64, 3, 48, 48) and ids.tolist() == list(range(64))


def test_more_workers_than_cores_is_one_warning_naming_the_setting(
    tmp_path: Path, monkeypatch, caplog, recwarn
):
    """torch's own warning (PaddleClas's GeneralRecognitionV2 config asks for 8 and 4
    workers) was a multi-line Python warning, twice per loader, naming no setting."""
    for name in ("a", "b"):
        save_png(tmp_path / name / "x.png", pattern(8, 8))
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})  # a 1-core host, for torch too
    split = DataSplitConfig.model_validate(
        {
            "dataset": {
                "name": "ImageFolderDataset",
                "root": str(tmp_path),
                "transform_ops": [{"ResizeImage": {"size": 8}}, {"NormalizeImage": {}}],
            },
            "loader": {"num_workers": 2},
        }
    )
    with caplog.at_level(logging.WARNING):
        loader = build_eval_loader(
            split, init_distributed("cpu"), seed=0, where="DataLoader.Eval.Query"
        )
        assert len(list(loader)) == 1
    assert caplog.messages == [
        "DataLoader.Eval.Query.loader.num_workers 2 is more than the CPU cores this process "
        "may use (1): the extra worker processes only compete for them, which may slow or stall "
        "loading; lower it (-o DataLoader.Eval.Query.loader.num_workers=1)"
    ]
    assert not [w for w in recwarn if "worker processes" in str(w.message)]


def test_an_eval_set_without_normalisation_or_resize_is_warned_of_by_key(grocery: Path, caplog):
    """Replacing a whole dataset with -o drops its transform_ops: the model then scores raw
    pixels at each photo's size, recall falls and nothing else says why."""
    dataset = {"name": "GroceryStoreDataset", "image_root": str(grocery),
               "cls_label_path": str(grocery / "val.txt")}  # fmt: skip
    resize = {"ResizeImage": {"size": 48}}
    normalize = {"NormalizeImage": {"mean": MEAN, "std": STD}}
    for ops, missing in (
        (None, "no NormalizeImage and no resize to one size (ResizeImage with size, "
               "RandCropImage, CropImage, RandCropImageV2): the model gets unnormalised 0-255 "
               "pixels, each image at its own size"),
        ([resize], "no NormalizeImage: the model gets unnormalised 0-255 pixels, not"),
        ([normalize], "no resize to one size (ResizeImage with size, RandCropImage, "
                      "CropImage, RandCropImageV2): the model gets each image at its own size"),
        # the short side resized, the aspect ratio kept: no batch of portrait and landscape
        ([{"ResizeImage": {"resize_short": 48}}, normalize], "no resize to one size (Resize"),
        ([{"ResizeImage": {"resize_short": 56}}, {"CropImage": {"size": 48}}, normalize], None),
        ([{"ResizeImage": {"size": 48, "resize_short": -1}}, normalize], None),
        ([resize, normalize], None),
    ):  # fmt: skip
        split = DataSplitConfig.model_validate(
            {"dataset": {**dataset, "transform_ops": ops}, "loader": {"num_workers": 0}}
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shitu"):
            build_eval_loader(split, init_distributed("cpu"), seed=0, where="DataLoader.Eval.Query")
        if missing is None:
            assert not caplog.records
        else:
            assert f"DataLoader.Eval.Query.dataset.transform_ops has {missing}" in caplog.text
            assert "override only the keys that change" in caplog.text


@pytest.mark.parametrize("workers", [0, 1])
def test_images_of_different_sizes_in_a_batch_name_the_transform_ops(tmp_path: Path, workers):
    """Without a resize, torch's own error ('stack expects each tensor to be equal size')
    names no setting: the one that needs an op giving every image one size is named."""
    for name, (width, height) in (("a", (8, 6)), ("b", (6, 8))):
        save_png(tmp_path / "class" / f"{name}.png", pattern(width, height))
    split = DataSplitConfig.model_validate(
        {
            "dataset": {"name": "ImageFolderDataset", "root": str(tmp_path)},
            "sampler": {"name": "DistributedBatchSampler", "batch_size": 2},
            "loader": {"num_workers": workers},
        }
    )
    loader = build_eval_loader(
        split, init_distributed("cpu"), seed=0, where="DataLoader.Eval.Query"
    )
    with pytest.raises(ConfigError) as caught:
        next(iter(loader))
    assert raised_message(caught.value) == (
        "DataLoader.Eval.Query.dataset.transform_ops: images of different sizes in one batch "
        "((3, 6, 8) and (3, 8, 6), channels x height x width); give them one size with a "
        "ResizeImage {size: [W, H]} or a crop (RandCropImage, CropImage, RandCropImageV2)"
    )


def test_dataloader_config_errors_name_the_section(grocery: Path):
    split = DataSplitConfig.model_validate(
        {
            "dataset": {
                "name": "GroceryStoreDataset",
                "image_root": str(grocery),
                "cls_label_path": str(grocery / "val.txt"),
                "label_levl": "fine",
            }
        }
    )
    with pytest.raises(
        ConfigError,
        match=r"DataLoader\.Eval\.Query\.dataset: label_levl: unknown key "
        r"\(did you mean 'label_level'\?\)",
    ):
        build_eval_loader(split, init_distributed("cpu"), seed=0, where="DataLoader.Eval.Query")
    split = DataSplitConfig.model_validate(
        {
            "dataset": {
                "name": "GroceryStoreDataset",
                "image_root": str(grocery),
                "cls_label_path": str(grocery / "val.txt"),
            },
            "sampler": {"name": "PKSampler", "batch_size": 8},
        }
    )
    with pytest.raises(
        ConfigError, match=r"DataLoader\.Train\.sampler: sample_per_id: required key missing"
    ):
        build_train_loader(split, init_distributed("cpu"), seed=0)
