"""Runtimes for an exported model: onnxruntime (the default CPU path), OpenVINO (optional,
often faster on x86 CPUs) and torch (fallback, GPU).

Each takes a float32 NCHW batch (numpy) and returns raw float32 [N, D] features. Only the
torch backend imports torch (a second or more), when it is chosen.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shitu.errors import CheckpointError, ConfigError
from shitu.fileio import refuse_non_utf8_path
from shitu.inference.choices import BACKENDS, DEVICES, PRECISIONS
from shitu.inference.manifest import INPUT_NAME, INT8_FILE, ONNX_FILE
from shitu.onnx_input import image_input_size

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch's names


class Backend(Protocol):
    name: str
    input_size: tuple[int, int] | None  # the graph's fixed (height, width), if it has one

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def check_runtime_names(backend: str, precision: str, device: str) -> None:
    """A ConfigError for a name that is none of the known ones; checked before any work (a
    compact export's ONNX model is built into the cache before the backend is chosen)."""
    for what, value, known in (
        ("backend", backend, BACKENDS),
        ("precision", precision, PRECISIONS),
        ("device", device, DEVICES),
    ):
        if value not in known:
            raise ConfigError(f"{what}: unknown {value!r}; use one of {', '.join(known)}")


def choose_backend(model_dir: Path, backend: str, precision: str, device: str = "cpu") -> str:
    """'auto': onnxruntime when installed, able to run on `device` and the export has the
    ONNX file, else torch (the onnxruntime package shitu installs has no CUDA, torch may)."""
    check_runtime_names(backend, precision, device)
    # torch is refused int8 below: made as this message says, the file would be refused too
    if precision == "int8" and backend != "torch" and not (model_dir / INT8_FILE).is_file():
        raise ConfigError(
            f"precision int8: {model_dir} has no {INT8_FILE}; {_int8_advice(model_dir)}"
        )
    if backend == "auto":
        if precision in ("fp16", "bf16"):
            return "torch"
        onnx_file = INT8_FILE if precision == "int8" else ONNX_FILE
        usable = onnxruntime_available() and (model_dir / onnx_file).is_file()
        if device == "cuda" and precision == "fp32":  # int8 has no torch path to fall back to
            usable = usable and _onnxruntime_has_cuda()
        backend = "onnxruntime" if usable else "torch"
    if backend == "torch" and precision == "int8":
        raise ConfigError("precision int8 runs on onnxruntime or openvino, not torch")
    if backend != "torch" and precision in ("fp16", "bf16"):
        raise ConfigError(f"precision {precision} runs on the torch backend (a GPU) only")
    if backend == "openvino":
        if not openvino_available():
            raise ConfigError("backend openvino: not installed (pip install 'shitu[openvino]')")
        if device != "cpu":
            raise ConfigError(f"backend openvino runs on the CPU only, not device {device}")
    return backend


def _int8_advice(model_dir: Path) -> str:
    """How to get the int8 model `model_dir` lacks; for the shipped one, the whole command."""
    from shitu.inference.default_model import default_int8_export_command, is_shipped_model

    if not is_shipped_model(model_dir):
        # A compact export has no ONNX model to quantise: --compact refuses the calibration.
        compact = "" if (model_dir / ONNX_FILE).is_file() else " without --compact"
        return (
            f"make an export that has one with `shitu export ... --int8-calibration IMAGES`"
            f"{compact} (docs/commands.md: int8)"
        )
    return (
        "the shipped model comes without one: export it with one, calibrated on about 64 of "
        f"your photos, `{default_int8_export_command()}`, then give --model default_int8"
    )


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _onnxruntime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


class OnnxBackend:
    """onnxruntime session with all graph optimisations (BN folding, NCHWc conv layouts)."""

    name = "onnxruntime"

    def __init__(self, path: Path, num_threads: int | None, device: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if num_threads:
            options.intra_op_num_threads = num_threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if not _onnxruntime_has_cuda():
                raise ConfigError("device cuda: this onnxruntime has no CUDA support")
            providers.insert(0, "CUDAExecutionProvider")
        refuse_non_utf8_path(path, "the model file's path", "onnxruntime", CheckpointError)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_size = image_input_size(self.session.get_inputs()[0].shape, path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: batch})[0]


class OpenVinoBackend:
    """An OpenVINO CPU model compiled from the ONNX file (fp32 or int8), in float32
    arithmetic: OpenVINO's own default on CPUs with bf16 instructions is bf16, whose
    features differ from fp32's (and which crashed a test run; see the default model's
    record, docs/default_model_research.md)."""

    name = "openvino"

    def __init__(self, path: Path, num_threads: int | None) -> None:
        import openvino

        settings: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",  # THROUGHPUT halves speed on 2 cores (measured)
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if num_threads:
            settings["INFERENCE_NUM_THREADS"] = num_threads
        core = openvino.Core()
        model = core.read_model(str(path))
        # judged before compiling, which fails obscurely on an unknown rank ([] to the
        # other readers; such a shape cannot be iterated)
        shape = model.input(0).get_partial_shape()
        dims = [dim.get_length() if dim.is_static else None for dim in shape]
        self.input_size = image_input_size(dims if shape.rank.is_static else [], path)
        compiled = core.compile_model(model, "CPU", settings)
        self._request, self._output = compiled.create_infer_request(), compiled.output(0)
        self._lock = threading.Lock()  # one infer request: calls from threads take turns

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._request.infer({0: batch})[self._output].copy()


class TorchBackend:
    """The exported weights in our own model; fp16/bf16 on a GPU."""

    name = "torch"
    input_size: tuple[int, int] | None = None  # our model takes any size

    def __init__(
        self,
        model_dir: Path,
        manifest: dict[str, Any],
        num_threads: int | None,
        device: str,
        precision: str,
    ) -> None:
        import torch

        from shitu.inference.export import FeaturesOnly, load_exported_model

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda: torch here sees no CUDA GPU")
        if precision != "fp32" and self.device.type == "cpu":
            raise ConfigError(f"precision {precision} needs a GPU (device cuda)")
        self.dtype = getattr(torch, _TORCH_DTYPES[precision])
        model = load_exported_model(model_dir, manifest)
        self.model = FeaturesOnly(model, manifest["output_key"]).eval()
        self.model.to(self.device, self.dtype)
        if self.device.type == "cuda":
            # Module.to takes memory_format; torch's overloads leave it out
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            images = torch.from_numpy(batch).to(self.device, self.dtype, non_blocking=True)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            return self.model(images).float().cpu().numpy()
