"""The image size an ONNX model's input takes, judged one way for every runtime that opens
one (onnxruntime, OpenVINO, the `onnx` reader behind the detector's weight import), so that
the recogniser and the detector agree on what a fixed, a dynamic and a malformed input is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from shitu.errors import CheckpointError

if TYPE_CHECKING:
    from onnx import GraphProto

# One input dimension as the runtimes report it: a fixed length, a symbol name, or None.
# A length of 0 or less is what some exporters write for "any", so it counts as dynamic too.
Dim = int | str | None


def _fixed(dim: Dim) -> TypeGuard[int]:
    """A usable fixed length (bool is an int to Python, never a length)."""
    return isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def image_input_size(shape: Sequence[Dim], model: str | Path) -> tuple[int, int] | None:
    """(height, width) of an NCHW RGB input [N, 3, H, W] whose sides are fixed, or None when
    both are dynamic (the model takes any size).

    Everything else cannot be fed the batches shitu makes, so it is refused up front with
    `model` named, instead of failing inside the runtime at the first image: another rank,
    a fixed channel count other than 3 (e.g. channels-last [N, H, W, 3]), and a model that
    fixes only one side.
    """
    shown = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    if len(shape) != 4:
        raise CheckpointError(f"{model}: input {shown} is not an image batch [N, 3, H, W]")
    channels, height, width = shape[1:]
    if _fixed(channels) and channels != 3:
        layout = " (channels last? export it as NCHW)" if shape[3] == 3 else ""
        raise CheckpointError(f"{model}: input {shown} is not [N, 3, H, W]{layout}")
    if _fixed(height) and _fixed(width):
        return height, width
    if _fixed(height) or _fixed(width):
        raise CheckpointError(
            f"{model}: input {shown} fixes one side only; export it with both H and W fixed "
            "or both dynamic"
        )
    return None


def graph_input_shape(graph: GraphProto) -> list[Dim]:
    """The first input's dims of an `onnx` GraphProto as onnxruntime reports them (a symbol
    name for a named dim, None for an unset one, [] for an unknown rank), so a file read
    without a runtime is judged like one opened by it."""
    tensor = graph.input[0].type.tensor_type
    if not tensor.HasField("shape"):
        return []
    return [getattr(d, kind) if (kind := d.WhichOneof("value")) else None for d in tensor.shape.dim]
