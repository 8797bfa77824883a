"""Feature extraction speed of the shipped default model, end to end from JPEG files.

Usage: python benchmarks/default_model_speed.py [--threads 2] [--batches 1 32] [--images 128]
       [--rounds 3] [--int8-calibration 64] [--model DIR]

Times `FeatureExtractor.extract_files` (decode + resize + normalise in threads, overlapped
with the runtime) on Grocery Store JPEGs with the default model as shipped (its ONNX model
rebuilt once into the cache; --model times another `shitu export` folder instead) and with
an int8 quantisation of it (calibrated on every other timed photo, built in a temporary folder), on
onnxruntime and, when `pip install openvino` was done, on OpenVINO.
Timings follow one warm-up batch; rounds are interleaved so background load hits all
alike; the table gives median and best round.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from arguments import add_batch_timing_arguments, benchmark_parser, count  # noqa: E402
from feature_extraction import grocery_images, ours, timed  # noqa: E402

from shitu.inference import default_model_dir, read_manifest  # noqa: E402
from shitu.inference.backends import openvino_available  # noqa: E402
from shitu.inference.cache import full_export  # noqa: E402
from shitu.inference.export import (  # noqa: E402
    INT8_FILE,
    MANIFEST,
    ONNX_FILE,
    file_sha256,
)
from shitu.inference.preprocess import Preprocessing  # noqa: E402
from shitu.inference.quantize import quantize_static_onnx  # noqa: E402

INT8_CALIBRATION = 64  # photos, unless --int8-calibration says


def onnx_export(model_dir: Path) -> Path:
    """The export with the ONNX model that `FeatureExtractor.load` runs: `model_dir` itself,
    or for a compact export its cached rebuild (a full export is not copied into the user
    cache, where nothing else would use it)."""
    if (model_dir / ONNX_FILE).is_file():
        return model_dir
    return full_export(model_dir, read_manifest(model_dir))


def int8_copy(fp32_dir: Path, out: Path, calibration: list[str]) -> Path:
    """A copy of the (cached) fp32 export with model.int8.onnx added to it."""
    shutil.copytree(fp32_dir, out)
    manifest = read_manifest(out)
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    quantize_static_onnx(out / ONNX_FILE, out / INT8_FILE, preprocessing, calibration)
    manifest["files"][INT8_FILE] = file_sha256(out / INT8_FILE)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def calibration_photos(
    parser: argparse.ArgumentParser, paths: list[str], wanted: int | None
) -> list[str]:
    """Every other timed photo, `wanted` of them (None: up to INT8_CALIBRATION); a usage
    error where there are fewer: more than --images gives were taken silently as fewer,
    and the table did not say how many."""
    available = paths[1::2]
    if not available:
        parser.error(f"--images {len(paths)}: at least 2, int8 calibration takes every other")
    if wanted is not None and wanted > len(available):
        parser.error(
            f"--int8-calibration {wanted}: at most {len(available)}, every other one of the "
            f"{len(paths)} timed photos (--images)"
        )
    return available[: wanted or INT8_CALIBRATION]


def main() -> None:
    parser = benchmark_parser(__doc__)
    add_batch_timing_arguments(parser)
    parser.add_argument("--images", type=count, default=128, help="Grocery Store JPEGs timed")
    parser.add_argument("--rounds", type=count, default=3, help="interleaved timing rounds")
    parser.add_argument(
        "--int8-calibration",
        type=count,
        help="photos that calibrate the int8 model, every other timed one (default: "
        f"{INT8_CALIBRATION}, or as many as --images gives)",
    )
    parser.add_argument(
        "--model", type=Path, help="a `shitu export` folder to time instead of the default model"
    )
    args = parser.parse_args()

    paths = grocery_images(args.images)
    calibration = calibration_photos(parser, paths, args.int8_calibration)
    shipped = (args.model or default_model_dir()).resolve()
    cached = onnx_export(shipped)  # an ExportError is one line (see benchmark_parser)
    with tempfile.TemporaryDirectory() as scratch:
        int8_dir = int8_copy(cached, Path(scratch) / "int8", calibration)
        rows = []
        for batch in args.batches:
            runs = {
                "onnxruntime fp32": ours(cached, args.threads, batch),
                "onnxruntime int8": ours(int8_dir, args.threads, batch, precision="int8"),
            }
            if openvino_available():
                runs["openvino fp32"] = ours(cached, args.threads, batch, backend="openvino")
                runs["openvino int8"] = ours(
                    int8_dir, args.threads, batch, backend="openvino", precision="int8"
                )
            speeds: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    speeds[name].append(timed(run, paths, batch)[0])
            for name, values in speeds.items():
                rows.append((name, batch, statistics.median(values), max(values)))

    manifest = read_manifest(shipped)
    size = manifest["preprocessing"].get("crop") or manifest["preprocessing"]["resize"]
    which = "model" if args.model else "default model"
    print(
        f"{which} {manifest['arch_name']} {manifest['embedding_size']}-d, input {size}, "
        f"{len(paths)} JPEGs (int8 calibrated on {len(calibration)} of them), "
        f"{args.threads} threads, {platform.processor() or platform.machine()}"
    )
    print("| path | batch | images/s (median) | images/s (best) |")
    print("|---|---:|---:|---:|")
    for name, batch, median, best in rows:
        print(f"| {name} | {batch} | {median:.1f} | {best:.1f} |")


if __name__ == "__main__":
    main()
