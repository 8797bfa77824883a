"""int8 static quantisation of an exported ONNX model with onnxruntime (QDQ, per channel).

Activation ranges are calibrated on real images run through the export's own
preprocessing, so the quantised model sees exactly what it will see at inference.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from shitu.data.transforms.ops import UnreadableImageError
from shitu.errors import DataError
from shitu.image_files import path_list
from shitu.inference.preprocess import Preprocessing, read_rgb

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
    preprocessing: Preprocessing, images: Sequence[str | Path]
) -> list[np.ndarray]:
    """The usable `images`, preprocessed, in batches (an export reads them before its ONNX
    export and check, so a folder of no images is refused before that work). Those that
    cannot be read, or are of a size the preprocessing cannot take, are left out with a
    warning saying which of the two; a DataError where none is usable, or where an item is
    no path (`path_list`: it raised a TypeError)."""
    images = path_list(images)
    unread: list[str] = []
    unfit: list[str] = []
    batches = list(_calibration_batches(preprocessing, images, unread, unfit))
    left_out = _left_out(unread, unfit)
    if not batches:
        raise DataError(
            f"int8 calibration: no calibration image could be used ({len(images)} given)"
            + (f": {left_out}" if left_out else "")
        )
    if left_out:
        logger.warning(
            "int8 calibration: %d of %d images left out: %s; calibrated on the other %d",
            len(unread) + len(unfit),
            len(images),
            left_out,
            len(images) - len(unread) - len(unfit),
        )
    return batches


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


def quantize_calibrated(fp32_path: Path, out_path: Path, batches: Sequence[np.ndarray]) -> None:
    """`quantize_static_onnx` with the activation ranges of `calibration_batches`' batches."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        with _quiet_per_tensor_fallbacks():
            quantize_static(
                str(prepared),
                str(out_path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )


def _calibration_batches(
    preprocessing: Preprocessing,
    images: Sequence[str | Path],
    unread: list[str],
    unfit: list[str],
) -> Iterator[np.ndarray]:
    """The usable images in batches; each left out goes to `unread` (the file could not be
    decoded) or `unfit` (decoded, but of a size the preprocessing cannot take), with why."""
    batch: list[np.ndarray] = []
    for path in images:
        try:
            image = read_rgb(path)
        except UnreadableImageError as exc:
            unread.append(f"{path}: {exc}")
            continue
        try:
            batch.append(preprocessing.normalize(preprocessing.prepare(image)))
        except UnreadableImageError as exc:
            unfit.append(f"{path}: {exc}")
            continue
        if len(batch) == CALIBRATION_BATCH:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
