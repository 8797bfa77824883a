"""One way to write ONNX files, shared by the recogniser and the detector exports."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

# torch.onnx.export keeps its state in globals (and catch_warnings swaps the process's
# filters): two exports at once, as two threads' first loads of a compact export make,
# failed with torch's "AssertionError: GLOBALS.in_onnx_export must be True".
_EXPORTING = threading.Lock()


def trace_to_onnx(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, **options: Any
) -> None:
    """`torch.onnx.export` with the TorchScript exporter (dynamo=False), without its notice.

    The TorchScript exporter handles these models' dynamic batch axes without extra
    dependencies; torch announces its deprecation on every call, which users cannot act on.
    One export runs at a time in a process (`_EXPORTING`).
    """
    with _EXPORTING, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=False, **options)
