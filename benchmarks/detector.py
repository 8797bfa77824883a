"""Detector speed on this CPU: ms per image (preprocess + network + decode + NMS).

Backends: our PyTorch PicoDet and onnxruntime (our export, and PaddleDetection's export
when given). Random weights are fine for speed; the mainbody architecture runs at 640.

    python benchmarks/detector.py --onnx $MODELS/picodet_s_coco/picodet_s_416_coco.onnx
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from arguments import benchmark_parser, count, existing_file

from shitu.detection import OnnxDetector, TorchDetector, build_picodet, load_detector
from shitu.detection.export import export_onnx


def ms_per_image(detector, image: np.ndarray, repeats: int) -> float:
    detector.detect(image)
    start = time.perf_counter()
    for _ in range(repeats):
        detector.detect(image)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--onnx", type=existing_file, action="append", default=[], help="extra ONNX detectors"
    )
    parser.add_argument("--repeats", type=count, default=5, help="timed runs per image")
    parser.add_argument("--threads", type=count, default=1, help="torch and onnxruntime threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("picodet_lcnet_x2_5_mainbody", "picodet_s_esnet"):
            model = build_picodet(arch).eval()
            size = model.arch.input_size
            rows.append(
                (arch, size, "torch", ms_per_image(TorchDetector(model), image, args.repeats))
            )
            exported = export_onnx(model, Path(tmp) / f"{arch}.onnx")
            rows.append(
                (
                    arch,
                    size,
                    "onnxruntime",
                    ms_per_image(OnnxDetector(exported, threads=args.threads), image, args.repeats),
                )
            )
        for path in args.onnx:
            detector = OnnxDetector(path, threads=args.threads)
            size = detector.input_size[0]
            rows.append(
                (path.name, size, "onnxruntime", ms_per_image(detector, image, args.repeats))
            )
            torch_detector = load_detector(path, backend="torch", input_size=size)
            rows.append(
                (path.name, size, "torch", ms_per_image(torch_detector, image, args.repeats))
            )
    print(f"CPU threads: {args.threads}, image 640x480, {args.repeats} runs each\n")
    print("| model | input | backend | ms / image |")
    print("|---|---|---|---|")
    for name, size, backend, ms in rows:
        print(f"| {name} | {size} | {backend} | {ms:.1f} |")


if __name__ == "__main__":
    main()
