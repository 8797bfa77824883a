"""CPU feature extraction, end to end from JPEG files: Paddle Inference vs paddle2onnx vs ours.

Usage: python benchmarks/feature_extraction.py [--threads 2] [--batches 1 32] [--images 128]
       [--rounds 3] [--torch] [--work DIR]

Model: PaddleClas PP-LCNetV2_base ShiTu + BNNeck without head (our config
GeneralRecognitionV2_PPLCNetV2_base without head), 224x224, random weights with realistic
BatchNorm statistics, built by PaddleClas in the Paddle reference venv (tests/parity) and
shared with us through its .pdparams (`export_model` reads them). Compared, with the same
thread count and the same Grocery Store JPEGs:
  (a) Paddle Inference (paddlepaddle, oneDNN/MKLDNN on), PaddleClas deploy preprocessing;
  (b) paddle2onnx + onnxruntime, the same preprocessing;
  (c) ours: `shitu export` folder + FeatureExtractor.extract_files (auto backend), plus
      the int8 export and (--torch) the torch backend for reference.
Timings exclude process start and model loading and follow one warm-up batch. Rounds are
interleaved so background load hits every method alike; the table gives the median and
the best round. Feature differences are on L2-normalised features, against Paddle's.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from arguments import add_batch_timing_arguments, benchmark_parser, count, folder  # noqa: E402
from common import grocery_root  # noqa: E402
from deploy_preprocess import batch as deploy_batch  # noqa: E402

from shitu.config import load_config  # noqa: E402
from shitu.inference import FeatureExtractor, export_model  # noqa: E402
from shitu.inference.extractor import l2_normalize  # noqa: E402
from tests.parity.paddle_env import paddle_python  # noqa: E402

PADDLE2ONNX = "paddle2onnx==2.1.0"
PADDLE_SCRIPT = HERE / "paddle_feature_extraction.py"


def grocery_images(count: int) -> list[str]:
    root = grocery_root()
    lines = [line for line in (root / "val.txt").read_text().splitlines() if line.strip()]
    lines += [line for line in (root / "train.txt").read_text().splitlines() if line.strip()]
    step = max(1, len(lines) // count)
    return [str(root / line.split(",")[0].strip()) for line in lines[::step][:count]]


def paddle_env(threads: int) -> dict[str, str]:
    # paddle2onnx's optimiser (polygraphy) would otherwise pip-install packages mid-run
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "GLOG_minloglevel": "3",
        "POLYGRAPHY_AUTOINSTALL_DEPS": "0",
    }


def build_models(work: Path, paths_file: Path, paths: list[str]) -> Path:
    """Paddle model (+ paddle2onnx) and our export from the same .pdparams; cached in `work`."""
    python = paddle_python()
    paddle_dir = work / "paddle"
    if not (paddle_dir / "paddle2onnx.onnx").is_file():
        probe = subprocess.run([str(python), "-c", "import paddle2onnx"], capture_output=True)
        if probe.returncode != 0:
            if os.environ.get("SHITU_PADDLE_PYTHON"):  # the user's environment: not ours to change
                sys.exit(
                    f"{python} has no paddle2onnx: `{python} -m pip install {PADDLE2ONNX}`, or "
                    "unset SHITU_PADDLE_PYTHON to use the cached Paddle reference venv"
                )
            print(f"adding {PADDLE2ONNX} to the cached Paddle venv (once)", file=sys.stderr)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", PADDLE2ONNX, "packaging"], check=True
            )
        paddle_dir.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(
            [str(python), str(PADDLE_SCRIPT), "build", str(paddle_dir), str(paths_file)],
            capture_output=True,
            text=True,
            env=paddle_env(2),
        )
        if built.returncode != 0:
            sys.exit(f"building the Paddle model failed:\n{built.stderr[-3000:]}")
    ours = work / "ours"
    if not (ours / "model.int8.onnx").is_file():
        config = load_config("GeneralRecognitionV2_PPLCNetV2_base", [])
        config.Arch.Head = None
        export_model(
            config, paddle_dir / "model.pdparams", ours, calibration_images=paths[::2][:64]
        )
    return paddle_dir


def run_paddle(
    paddle_dir: Path, paths_file: Path, batch: int, threads: int, out: Path
) -> tuple[float, np.ndarray]:
    command = [paddle_python(), PADDLE_SCRIPT, "run", paddle_dir, paths_file, batch, threads, out]
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=paddle_env(threads),
    )
    if result.returncode != 0:
        raise RuntimeError(f"Paddle Inference failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["images"] / report["seconds"], np.load(out)


def timed(fn: Callable[[list[str]], np.ndarray], paths: list[str], batch: int) -> tuple:
    fn(paths[:batch])  # warm-up
    start = time.perf_counter()
    features = fn(paths)
    return len(paths) / (time.perf_counter() - start), features


def onnx_serial(model: Path, threads: int, batch: int) -> Callable[[list[str]], np.ndarray]:
    """(b): onnxruntime on the paddle2onnx model with Paddle's serial deploy preprocessing."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(paths: list[str]) -> np.ndarray:
        chunks = [
            session.run(None, {name: deploy_batch(paths[i : i + batch])})[0]
            for i in range(0, len(paths), batch)
        ]
        return np.concatenate(chunks)

    return run


def ours(model: Path, threads: int, batch: int, **options) -> Callable[[list[str]], np.ndarray]:
    extractor = FeatureExtractor.load(model, num_threads=threads, **options)

    def run(paths: list[str]) -> np.ndarray:
        return extractor.extract_files(paths, batch_size=batch).features

    return run


def main() -> None:
    parser = benchmark_parser(__doc__)
    add_batch_timing_arguments(parser)
    parser.add_argument("--images", type=count, default=128, help="Grocery Store JPEGs timed")
    parser.add_argument("--rounds", type=count, default=3, help="interleaved timing rounds")
    parser.add_argument("--torch", action="store_true", help="also time the torch backend")
    parser.add_argument("--work", type=folder, help="model cache (default: a temporary folder)")
    args = parser.parse_args()
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        paths = grocery_images(args.images)
        paths_file = work / "images.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        paddle_dir = build_models(work, paths_file, paths)

        methods: dict[str, Callable[[int], Callable[[list[str]], np.ndarray]]] = {
            "(b) paddle2onnx + onnxruntime": lambda b: onnx_serial(
                paddle_dir / "paddle2onnx.onnx", args.threads, b
            ),
            "(c) ours, onnxruntime fp32": lambda b: ours(work / "ours", args.threads, b),
            "ours, onnxruntime int8": lambda b: ours(
                work / "ours", args.threads, b, precision="int8"
            ),
        }
        if args.torch:
            methods["ours, torch fp32"] = lambda b: ours(
                work / "ours", args.threads, b, backend="torch"
            )
        speeds: dict[tuple[str, int], list[float]] = {}
        diffs: dict[tuple[str, int], float] = {}
        reference: dict[int, np.ndarray] = {}
        for _ in range(args.rounds):
            for batch in args.batches:
                name = "(a) Paddle Inference, MKLDNN"
                rate, features = run_paddle(
                    paddle_dir, paths_file, batch, args.threads, work / "paddle.npy"
                )
                reference[batch] = l2_normalize(features)
                speeds.setdefault((name, batch), []).append(rate)
                diffs[(name, batch)] = 0.0
                for name, make in methods.items():
                    rate, features = timed(make(batch), paths, batch)
                    speeds.setdefault((name, batch), []).append(rate)
                    diff = np.abs(l2_normalize(features) - reference[batch]).max()
                    diffs[(name, batch)] = float(diff)

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} threads, {len(paths)} Grocery JPEGs (348x348) -> 224x224, "
        f"{args.rounds} interleaved rounds; onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}"
    )
    print()
    print("| method | batch | images/s median (best) | vs (a) | vs (b) | max abs diff vs (a) |")
    print("|---|---:|---:|---:|---:|---:|")
    paddle_name, onnx_name = "(a) Paddle Inference, MKLDNN", "(b) paddle2onnx + onnxruntime"
    for batch in args.batches:
        base_a = statistics.median(speeds[(paddle_name, batch)])
        base_b = statistics.median(speeds[(onnx_name, batch)])
        for name in [paddle_name, *methods]:
            values = speeds[(name, batch)]
            median = statistics.median(values)
            print(
                f"| {name} | {batch} | {median:.1f} ({max(values):.1f}) | {median / base_a:.2f}x "
                f"| {median / base_b:.2f}x | {diffs[(name, batch)]:.1e} |"
            )


if __name__ == "__main__":
    main()
