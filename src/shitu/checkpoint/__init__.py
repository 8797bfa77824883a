"""Model weight files: our safetensors/torch checkpoints and PaddleClas .pdparams import."""

from shitu.checkpoint.average import average_weights, interpolate_toward
from shitu.checkpoint.io import (
    LoadReport,
    load_pretrained,
    load_weights,
    model_metadata,
    read_weights,
    save_weights,
)
from shitu.checkpoint.paddle import paddle_to_torch, read_pdparams

__all__ = [
    "LoadReport",
    "average_weights",
    "interpolate_toward",
    "load_pretrained",
    "load_weights",
    "model_metadata",
    "paddle_to_torch",
    "read_pdparams",
    "read_weights",
    "save_weights",
]
