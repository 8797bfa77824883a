"""`shitu detect-export`: a PicoDet detector's weights -> an ONNX file for onnxruntime."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shitu.cli.common import add_detector_arch_argument, input_side
from shitu.errors import ConfigError
from shitu.fileio import refuse_file_in_the_way


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect-export",
        help="write a PicoDet detector (.pdparams, our .pt or a .onnx) as ONNX, for onnxruntime",
        description=(
            "Write a detector given as PaddleDetection .pdparams (with --det-arch), our "
            "checkpoint (a detect-train model.pt) or an ONNX file (to write it at another "
            "size) as an ONNX file with box decoding inside, at --input-size, its class names "
            "in it: the fast CPU path of `shitu detect "
            "--model` and `shitu recognize --detector`. The file is run with onnxruntime on "
            "a test image before it is written, and refused where its boxes are not torch's."
        ),
    )
    parser.add_argument(
        "weights", help="detector weights: .pdparams (with --det-arch), our .pt, or a .onnx"
    )
    parser.add_argument("--out", required=True, help="output file, .onnx")
    add_detector_arch_argument(parser, "--det-arch", "--arch")
    parser.add_argument(
        "--input-size",
        type=input_side,
        help="the input side the file runs at (a multiple of 32; default: the size the model "
        "runs at: a detect-train model.pt's --input-size, an ONNX file's own, a .pdparams's "
        "architecture's)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shitu.cli.detect import refuse_recognition_export
    from shitu.detection import load_detector
    from shitu.detection.export import export_onnx

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":  # detectors are told apart by their suffix
        raise ConfigError(f"--out {out}: give a file name ending in .onnx")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give the .onnx file to write")
    refuse_file_in_the_way(out.parent, f"--out {out}")  # named before the weights are read
    refuse_recognition_export(args.weights, "WEIGHTS")
    detector = load_detector(args.weights, "torch", args.arch, args.input_size)
    size = detector.input_size[0]
    path = export_onnx(detector.model, out, size, check_with_onnxruntime=True)
    print(json.dumps({"onnx": str(path), "input_size": size}))
    return 0
