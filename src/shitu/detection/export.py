"""ONNX export of our PicoDet with box decoding inside the graph.

The file has one input `image` [B, 3, S, S] (ImageNet-normalised RGB) and outputs
`scores` [B, N, C] (sigmoid) and `boxes` [B, N, 4] (x1, y1, x2, y2 in input pixels);
`OnnxDetector` adds rescaling and NMS, which stay out of the graph. The class names go
into the file's metadata (`CLASS_NAMES_KEY`, a JSON list), as our checkpoints carry them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from shitu.detection.detector import CLASS_NAMES_KEY
from shitu.detection.input_size import check_input_size
from shitu.detection.model import PicoDet
from shitu.errors import CheckpointError
from shitu.fileio import (
    folder_place,
    refuse_non_utf8_path,
    write_atomically,
    write_failure_reason,
)
from shitu.onnx_trace import trace_to_onnx


class _Decoded(nn.Module):
    def __init__(self, model: PicoDet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(image)


# Most an export's decoded boxes (input pixels) and scores may differ from torch's: float32
# arithmetic in another order (PicoDet-S at 416: 3e-4 pixels and 1e-6 in scores).
BOX_TOLERANCE = 1e-2
SCORE_TOLERANCE = 1e-4


def export_onnx(
    model: PicoDet,
    path: str | Path,
    input_size: int | None = None,
    check_with_onnxruntime: bool = False,
) -> Path:
    """`model` as an ONNX file at `path`, written whole or not at all: a stopped run or a
    refused write (a CheckpointError naming the file) leaves the file that was there, not
    a truncated graph (detect-train writes model.onnx over the one a resumed run made).
    `check_with_onnxruntime`: run the file on one image and refuse it (a CheckpointError,
    no file written) where its boxes or scores are not torch's. `model` is left in the
    mode it was in (torch's exporter put it in training mode: a detector of it then found
    other boxes)."""
    size = check_input_size(model.arch.input_size if input_size is None else input_size)
    path = Path(path)
    # Traced to and checked in a temporary file beside it, named by its full path: beside
    # the file a link at `path` points to, where `write_atomically` writes.
    readers = "torch's ONNX exporter and onnxruntime"
    place = folder_place(path).absolute()
    refuse_non_utf8_path(place, "the ONNX file's path", readers, CheckpointError)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            trace_to_onnx(
                _Decoded(model).eval(),  # the mode the exporter sets again after tracing
                (torch.zeros(1, 3, size, size),),
                tmp,
                input_names=["image"],
                output_names=["scores", "boxes"],
                dynamic_axes={
                    "image": {0: "batch"},
                    "scores": {0: "batch"},
                    "boxes": {0: "batch"},
                },
                opset_version=13,
            )
        exported = onnx.load(str(tmp))
        _size_class_scores(exported, model.arch.num_classes)
        names = json.dumps(list(model.arch.class_names))
        exported.metadata_props.add(key=CLASS_NAMES_KEY, value=names)
        onnx.save(exported, str(tmp))
        if check_with_onnxruntime:
            _check_same_outputs(model, tmp, size, path)

    training = model.training
    try:
        return write_atomically(path, write)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {write_failure_reason(exc)}") from None
    finally:
        model.train(training)


def _check_same_outputs(model: PicoDet, onnx_file: Path, size: int, path: Path) -> None:
    """A CheckpointError naming `path` where onnxruntime's decoded boxes or scores for
    `onnx_file` differ from `model`'s on one image (seeded noise, the same each time) by
    more than the tolerances: an op the exporter or the runtime gets wrong would otherwise
    ship a detector that finds other boxes than the weights it was made from."""
    import onnxruntime as ort

    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores, boxes = (output.numpy() for output in model.eval().predict(image))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    onnx_scores, onnx_boxes = session.run(["scores", "boxes"], {"image": image.numpy()})
    box_diff = float(np.abs(onnx_boxes - boxes).max())
    score_diff = float(np.abs(onnx_scores - scores).max())
    if not (box_diff <= BOX_TOLERANCE and score_diff <= SCORE_TOLERANCE):  # NaN included
        raise CheckpointError(
            f"{path}: not written, onnxruntime's output differs from torch's on a test image "
            f"(boxes by up to {box_diff:.3g} pixels, scores by {score_diff:.3g}; at most "
            f"{BOX_TOLERANCE} and {SCORE_TOLERANCE} expected)"
        )


def _size_class_scores(exported: onnx.ModelProto, num_classes: int) -> None:
    """The `scores` output declared [batch, N, C], as `boxes` is [batch, N, 4]: torch's
    exporter leaves the class scores' sides unsized, so a reader could not tell the class
    count of an export without class names (one of PaddleDetection weights, say), and
    `shitu detect --class-names` could not check a names file against it."""
    scores, boxes = exported.graph.output
    dims = scores.type.tensor_type.shape.dim
    dims[1].CopyFrom(boxes.type.tensor_type.shape.dim[1])
    dims[2].dim_value = num_classes
