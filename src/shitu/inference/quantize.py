"""int8 static quantisation of an exported ONNX model with onnxruntime (QDQ, per channel).

Activation ranges are calibrated on real images run through the export's own
preprocessing, so the quantised model sees exactly what it will see at inference.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np

from shitu.data.transforms.ops import UnreadableImageError
from shitu.errors import DataError
from shitu.image_files import path_list
from shitu.inference.preprocess import Preprocessing, read_rgb
from shitu.progress import ImageProgress

CALIBRATION_BATCH = 8
logger = logging.getLogger(__name__)


class _PerTensorFallbackNotice(logging.Filter):
    """onnxruntime warns, on the root logger, for every weight of rank 1 (the BNNeck's
    batch norm) that per-channel quantisation falls back to one scale for: expected here,
    not a problem for the user to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextmanager
def _quiet_per_tensor_fallbacks() -> Iterator[None]:
    root, notice = logging.getLogger(), _PerTensorFallbackNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def quantize_static_onnx(
    fp32_path: Path, out_path: Path, preprocessing: Preprocessing, images: Sequence[str | Path]
) -> None:
    """Write `out_path`: int8 weights (per output channel) and uint8 activations."""
    quantize_calibrated(fp32_path, out_path, calibration_batches(preprocessing, images))


def calibration_batches(
    preprocessing: Preprocessing, images: Sequence[str | Path], count: int | None = None
) -> list[np.ndarray]:
    """The usable `images` (at most `count` of them, evenly spaced from the first to the last:
    a folder's images come sorted by class, so its first ones would show only a few classes),
    preprocessed, in batches (an export reads them before its ONNX export and check, so a
    folder of no images is refused before that work). Those that cannot be read, or are of
    a size the preprocessing cannot take, are left out with a warning saying which of the
    two; a pick left out is replaced by the next usable image of its share of the list, else
    by any other, so that a few broken files do not shrink the calibration set. A DataError where
    none is usable, or where an item is no path (`path_list`: it raised a TypeError)."""
    images = path_list(images)
    unread: list[str] = []
    unfit: list[str] = []
    used = _calibration_arrays(preprocessing, images, count, unread, unfit)
    left_out = _left_out(unread, unfit)
    if not used:
        raise DataError(
            f"int8 calibration: no calibration image could be used ({len(images)} given)"
            + (f": {left_out}" if left_out else "")
        )
    if left_out:
        wanted = len(images) if count is None else min(count, len(images))
        if count is None:
            calibrated = f"calibrated on the other {len(used)}"
        elif len(used) < wanted:
            calibrated = f"calibrated on {len(used)}, fewer than the {wanted} asked for"
        else:
            calibrated = f"replaced by others: calibrated on {len(used)}"
        logger.warning(
            "int8 calibration: %d of %d images left out: %s; %s",
            len(unread) + len(unfit),
            len(images),
            left_out,
            calibrated,
        )
    return [
        np.stack(used[start : start + CALIBRATION_BATCH])
        for start in range(0, len(used), CALIBRATION_BATCH)
    ]


def _left_out(unread: list[str], unfit: list[str]) -> str:
    """What happened to the images left out, and the first of each kind with why: a small
    image read whole was said to be unreadable."""
    parts = []
    if unread:
        parts.append(f"{len(unread)} could not be read (first: {unread[0]})")
    if unfit:
        verb = "is" if len(unfit) == 1 else "are"
        parts.append(
            f"{len(unfit)} {verb} of a size the export's preprocessing cannot take (first: "
            f"{unfit[0]})"
        )
    return "; ".join(parts)


def quantize_calibrated(
    fp32_path: Path, out_path: Path, batches: Sequence[np.ndarray], progress: bool = False
) -> None:
    """`quantize_static_onnx` with the activation ranges of `calibration_batches`' batches.
    `progress`: a bar over the images run through the model, the long part (minutes for a
    full model at 224 px)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The batches in turn; each one asked for means the one before has been run."""

        def __init__(self, bar: ImageProgress) -> None:
            self._batches = iter(batches)
            self._bar = bar
            self._running = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            self._bar.update(self._running)
            batch = next(self._batches, None)
            self._running = 0 if batch is None else len(batch)
            return None if batch is None else {"images": batch}

    total = sum(len(batch) for batch in batches)
    with (
        tempfile.TemporaryDirectory(dir=out_path.parent) as scratch,
        ImageProgress(total, progress, "calibrating") as bar,
    ):
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        with _quiet_per_tensor_fallbacks():
            quantize_static(
                str(prepared),
                str(out_path),
                Reader(bar),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )


def _calibration_arrays(
    preprocessing: Preprocessing,
    images: list[str],
    count: int | None,
    unread: list[str],
    unfit: list[str],
) -> list[np.ndarray]:
    """The preprocessed usable images: the first usable one of each of `count` equal shares
    of `images` (the first of each share, or the next ones where those fail), then, where shares
    had none, the first usable untried ones. Each left out goes to `unread` (the file could
    not be decoded) or `unfit` (decoded, but of a size the preprocessing cannot take)."""
    total = len(images)
    shares = total if count is None else min(count, total)
    bounds = [share * total // shares for share in range(shares)] + [total]
    tried: set[int] = set()
    used: list[np.ndarray] = []
    for start, end in pairwise(bounds):
        for index in range(start, end):
            tried.add(index)
            array = _usable(preprocessing, images[index], unread, unfit)
            if array is not None:
                used.append(array)
                break
    for index in range(total):
        if len(used) == shares:
            break
        if index not in tried:
            array = _usable(preprocessing, images[index], unread, unfit)
            if array is not None:
                used.append(array)
    return used


def _usable(
    preprocessing: Preprocessing, path: str, unread: list[str], unfit: list[str]
) -> np.ndarray | None:
    """`path` preprocessed, or None with why in `unread` or `unfit`."""
    try:
        image = read_rgb(path)
    except UnreadableImageError as exc:
        unread.append(f"{path}: {exc}")
        return None
    try:
        return preprocessing.normalize(preprocessing.prepare(image))
    except UnreadableImageError as exc:
        unfit.append(f"{path}: {exc}")
        return None
