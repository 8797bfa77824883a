"""The input size of real (tiny, one Identity node) ONNX files, as read by every runtime
that opens one: fixed, dynamic in each way exporters write it, and malformed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from shitu.detection.detector import OnnxDetector
from shitu.errors import CheckpointError
from shitu.inference.backends import OnnxBackend, OpenVinoBackend
from shitu.onnx_input import Dim, graph_input_shape, image_input_size
from tests.onnx_helpers import tiny_model


def readers(path: Path) -> dict[str, list[Dim]]:
    """The input shape as onnxruntime reports it and as the `onnx` reader gives it."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {
        "onnxruntime": session.get_inputs()[0].shape,
        "onnx": graph_input_shape(onnx.load(path).graph),
    }


SIZES = [
    ([1, 3, 32, 48], (32, 48)),  # not square: (height, width), in that order
    (["batch", 3, 24, 24], (24, 24)),  # a dynamic batch does not matter
    ([1, None, 24, 24], (24, 24)),  # nor does an unset channel count
    (["batch", 3, "height", "width"], None),  # symbolic sides
    ([None, 3, None, None], None),  # unset sides
    ([1, 3, -1, -1], None),  # what some exporters write for "any"
    ([1, 3, 0, 0], None),  # likewise; never a usable fixed size
]


@pytest.mark.parametrize(("dims", "expected"), SIZES)
def test_the_input_size_is_the_same_from_every_reader(tmp_path, dims, expected):
    path = tiny_model(tmp_path, dims)
    for reader, shape in readers(path).items():
        assert image_input_size(shape, path) == expected, reader
    assert OnnxBackend(path, 1, "cpu").input_size == expected
    assert OpenVinoBackend(path, 1).input_size == expected


def test_the_onnx_reader_reports_dims_as_onnxruntime_does(tmp_path):
    dims = ["batch", 3, None, 32]
    assert readers(tiny_model(tmp_path, dims)) == {"onnxruntime": dims, "onnx": dims}
    unknown_rank = readers(tiny_model(tmp_path, None))
    assert unknown_rank == {"onnxruntime": [], "onnx": []}


MALFORMED = [
    ([1, 3, 32], r"input \[1, 3, 32\] is not an image batch \[N, 3, H, W\]"),
    (None, r"input \[\] is not an image batch"),  # unknown rank
    ([1, 32, 32, 3], r"is not \[N, 3, H, W\] \(channels last\? export it as NCHW\)"),
    ([1, 1, 32, 32], r"input \[1, 1, 32, 32\] is not \[N, 3, H, W\]$"),
    ([1, 3, 32, "width"], "fixes one side only"),
    ([1, 3, None, 32], r"input \[1, 3, \?, 32\] fixes one side only"),
]


@pytest.mark.parametrize(("dims", "message"), MALFORMED)
def test_an_input_that_is_not_an_nchw_image_batch_is_refused_naming_the_file(
    tmp_path, dims, message
):
    path = tiny_model(tmp_path, dims)
    for shape in readers(path).values():
        with pytest.raises(CheckpointError, match=message) as refused:
            image_input_size(shape, path)
        assert str(refused.value).startswith(f"{path}: ")
    with pytest.raises(CheckpointError, match=message):
        OnnxBackend(path, 1, "cpu")
    with pytest.raises(CheckpointError, match=message):
        OpenVinoBackend(path, 1)
    with pytest.raises(CheckpointError, match=message):
        OnnxDetector(path)


@pytest.mark.parametrize("dims", [["batch", 3, "height", "width"], [1, 3, 0, 0]])
def test_the_onnxruntime_detector_needs_a_fixed_size(tmp_path, dims):
    path = tiny_model(tmp_path, dims)
    with pytest.raises(CheckpointError, match="H and W are dynamic; use the torch backend"):
        OnnxDetector(path)


def test_a_fixed_size_model_runs_at_the_size_read(tmp_path):
    """The size read is the one the runtime accepts, and another is refused by it."""
    path = tiny_model(tmp_path, [1, 3, 32, 48])
    backend = OnnxBackend(path, 1, "cpu")
    height, width = backend.input_size
    batch = np.zeros((1, 3, height, width), np.float32)
    assert backend(batch).shape == batch.shape
    with pytest.raises(InvalidArgument, match="dimension"):
        backend(np.zeros((1, 3, width, height), np.float32))
