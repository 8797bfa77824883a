"""The runtimes, precisions and devices an exported model runs with, by name: plain values
that the command line offers without loading any runtime (see `shitu.inference.backends`)."""

from typing import Literal, get_args

BACKENDS = ("auto", "onnxruntime", "openvino", "torch")
PRECISIONS = ("fp32", "int8", "fp16", "bf16")
# The device names of Global.device, FeatureExtractor.load and --device alike: auto (a GPU
# where torch sees one), cpu, and a CUDA GPU as cuda or gpu (PaddleClas's name).
Device = Literal["auto", "cpu", "gpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)


def device_type(name: str) -> str:
    """'cuda' or 'cpu': what the device `name` (one of DEVICES) asks for. torch is imported
    for auto only: the onnxruntime path runs without it."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name in ("gpu", "cuda") else "cpu"
