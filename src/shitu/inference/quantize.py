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
from shitu.inference.preprocess import Preprocessing

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
    """The readable `images`, preprocessed, in batches (an export reads them before its ONNX
    export and check, so a folder of no images is refused before that work). Unreadable
    ones are left out with a warning; a DataError where none is readable."""
    skipped: list[str] = []
    batches = list(_calibration_batches(preprocessing, images, skipped))
    if not batches:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise DataError(
            f"int8 calibration: no calibration image could be read ({len(images)} given{first})"
        )
    if skipped:
        logger.warning(
            "int8 calibration: %d of %d images could not be read and were left out (first: "
            "%s); calibrated on the other %d",
            len(skipped),
            len(images),
            skipped[0],
            len(images) - len(skipped),
        )
    return batches


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
    preprocessing: Preprocessing, images: Sequence[str | Path], skipped: list[str]
) -> Iterator[np.ndarray]:
    """The readable images in batches; each unreadable one goes to `skipped`, with why."""
    batch: list[np.ndarray] = []
    for path in images:
        try:
            batch.append(preprocessing.load(path))
        except UnreadableImageError as exc:
            skipped.append(f"{path}: {exc}")
            continue
        if len(batch) == CALIBRATION_BATCH:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
