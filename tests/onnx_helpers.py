"""Real, tiny ONNX files for tests of the code that opens them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shitu.inference.export import INPUT_NAME
from shitu.onnx_input import Dim


def tiny_model(tmp_path: Path, dims: list[Dim] | None, conv_channels: int | None = None) -> Path:
    """An ONNX file whose one input has these dims (None: no shape, an unknown rank) and
    whose one node is an Identity, or with `conv_channels` a 1x1 Conv to that many outputs."""
    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weights = []
    if conv_channels is None:
        node = helper.make_node("Identity", [INPUT_NAME], ["y"])
    else:
        weight = np.zeros((conv_channels, 3, 1, 1), np.float32)
        weights = [numpy_helper.from_array(weight, "w")]
        node = helper.make_node("Conv", [INPUT_NAME, "w"], ["y"])
    graph = helper.make_graph([node], "tiny", [x], [y], initializer=weights)
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
