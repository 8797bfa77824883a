"""ONNX export of our PicoDet with box decoding inside the graph.

The file has one input `image` [B, 3, S, S] (ImageNet-normalised RGB) and outputs
`scores` [B, N, C] (sigmoid) and `boxes` [B, N, 4] (x1, y1, x2, y2 in input pixels);
`OnnxDetector` adds rescaling and NMS, which stay out of the graph. The class names go
into the file's metadata (`CLASS_NAMES_KEY`, a JSON list), as our checkpoints carry them.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from torch import nn

from shitu.detection.detector import CLASS_NAMES_KEY
from shitu.detection.input_size import check_input_size
from shitu.detection.model import PicoDet
from shitu.onnx_trace import trace_to_onnx


class _Decoded(nn.Module):
    def __init__(self, model: PicoDet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(image)


def export_onnx(model: PicoDet, path: str | Path, input_size: int | None = None) -> Path:
    size = check_input_size(model.arch.input_size if input_size is None else input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        trace_to_onnx(
            _Decoded(model.eval()),
            (torch.zeros(1, 3, size, size),),
            path,
            input_names=["image"],
            output_names=["scores", "boxes"],
            dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}, "boxes": {0: "batch"}},
            opset_version=13,
        )
    exported = onnx.load(str(path))
    names = json.dumps(list(model.arch.class_names))
    exported.metadata_props.add(key=CLASS_NAMES_KEY, value=names)
    onnx.save(exported, str(path))
    return path
