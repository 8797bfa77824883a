"""Which CPU runtime runs an exported recognition model fastest: the model call only.

Usage: python benchmarks/cpu_runtimes.py [--model DIR | --pplcnet] [--threads 2]
       [--batches 1 32] [--rounds 3]

shitu runs exports on onnxruntime by default. This script checks that choice on the
machine at hand against the other CPU runtimes within reach: OpenVINO (shitu's `--runtime
openvino`; only if `pip install openvino` was done), and torch eager, TorchScript
(traced, frozen, optimize_for_inference) and torch.compile (inductor, freezing; needs a C
compiler). Random batches of the model's input size, no decoding: end-to-end numbers are in
feature_extraction.py and default_model_speed.py. Model: `--model DIR`, the shipped default
model, or with --pplcnet PP-LCNetV2_base ShiTu with random weights (the model of the
Paddle comparison). Each runtime gets one warm-up call; the table gives the median and
the best of the rounds, and the largest feature difference from onnxruntime.
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from arguments import add_batch_timing_arguments, benchmark_parser, count, seconds  # noqa: E402
from common import model_dir  # noqa: E402

from shitu.config import load_config  # noqa: E402
from shitu.inference import FeatureExtractor, Preprocessing, export_model  # noqa: E402
from shitu.inference.backends import (  # noqa: E402
    OnnxBackend,
    OpenVinoBackend,
    TorchBackend,
    openvino_available,
)

Runner = Callable[[np.ndarray], np.ndarray]


def torch_runners(model: torch.nn.Module, example: np.ndarray) -> dict[str, Runner]:
    """Eager, TorchScript and torch.compile forms of the same float32 module."""
    x = torch.from_numpy(example)
    # A trace holds one input size, this batch's: the warnings that the shipped model's
    # padding arithmetic would not follow another size (two screenfuls) do not apply.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        script = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x)))
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(model)

    def wrap(module: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
        def run(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(batch)).numpy()

        return run

    return {
        "torch eager": wrap(model),
        "torch TorchScript": wrap(script),
        "torch.compile": wrap(compiled),
    }


def images_per_s(run: Runner, batch: np.ndarray, seconds: float) -> float:
    """Calls for about `seconds`, at least 3; images per second."""
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = benchmark_parser(__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="exported model folder (default: the shipped model)")
    which.add_argument("--pplcnet", action="store_true", help="PP-LCNetV2_base, random weights")
    add_batch_timing_arguments(parser, "CPU threads per runtime")
    parser.add_argument("--rounds", type=count, default=3, help="interleaved timing rounds")
    parser.add_argument("--seconds", type=seconds, default=3.0, help="per runtime, batch, round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.pplcnet:
            config = load_config("GeneralRecognitionV2_PPLCNetV2_base", ["Arch.Head=null"])
            folder = export_model(config, None, Path(tmp) / "model")
        else:
            folder = model_dir(args.model, Path(tmp))
        extractor = FeatureExtractor.load(folder, "onnxruntime", args.threads)
        onnx = extractor.backend
        assert isinstance(onnx, OnnxBackend)
        # the export's input size: its ONNX graph takes no other
        width, height = Preprocessing.from_dict(extractor.preprocessing).size
        eager = FeatureExtractor.load(folder, "torch", args.threads).backend
        assert isinstance(eager, TorchBackend)
        openvino = None
        if openvino_available():  # dynamic batch: one compiled model serves all sizes
            openvino = FeatureExtractor.load(folder, "openvino", args.threads).backend
            assert isinstance(openvino, OpenVinoBackend)
        rng = np.random.default_rng(0)
        rows = []
        for size in args.batches:
            batch = rng.standard_normal((size, 3, height, width), dtype=np.float32)
            runners: dict[str, Runner] = {"onnxruntime": onnx}
            if openvino is not None:
                runners["OpenVINO"] = openvino
            runners.update(torch_runners(eager.model, batch))
            reference = onnx(batch)
            results: dict[str, list[float]] = {name: [] for name in runners}
            differences = {}
            for name, run in runners.items():
                differences[name] = float(np.abs(run(batch) - reference).max())  # warm-up
            for _ in range(args.rounds):  # interleaved: background load hits all alike
                for name, run in runners.items():
                    results[name].append(images_per_s(run, batch, args.seconds))
            for name, speeds in results.items():
                rows.append((name, size, statistics.median(speeds), max(speeds), differences[name]))

    name = "PP-LCNetV2_base (random weights)" if args.pplcnet else args.model or "default model"
    print(
        f"\n{name}, {width}x{height}, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print("| runtime | batch | images/s (median) | images/s (best) | max diff vs onnxruntime |")
    print("|---|---:|---:|---:|---:|")
    for name, size, median, best, difference in rows:
        print(f"| {name} | {size} | {median:.1f} | {best:.1f} | {difference:.1e} |")
    if not any(row[0] == "OpenVINO" for row in rows):
        print("(OpenVINO not installed: pip install openvino to add it)")


if __name__ == "__main__":
    main()
