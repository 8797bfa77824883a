"""`shitu detect`: run a PicoDet detector on images, one JSON line per image."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shitu.cli.common import (
    add_detector_arch_argument,
    add_progress_argument,
    add_visualisation_arguments,
    detection_score,
    expand_images,
    input_side,
    positive_int,
    print_past_progress,
    progress_wanted,
    skip_reason,
    thread_count,
    unread_files_status,
    visualisation_writer,
)
from shitu.errors import ConfigError, DataError
from shitu.fileio import read_listing_text, removed_if_left_empty, text_lines
from shitu.image_files import undecodable_text_reason


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="find objects in images with a PicoDet detector (JSON lines on stdout)",
        description=(
            "Detect objects with a detector given by path: our checkpoint (.pt), a "
            "PaddleDetection .pdparams (with --arch) or an ONNX export. Prints one JSON "
            "object per image with boxes [x1, y1, x2, y2] in the image's pixels; folders "
            "are searched for images, unreadable ones reported and skipped."
        ),
    )
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    parser.add_argument("--model", required=True, help="detector: .pt, .pdparams or .onnx")
    add_detector_arch_argument(parser, "--arch", "--det-arch")
    parser.add_argument(
        "--class-names",
        metavar="FILE",
        help="one class name per line, for each box's label (e.g. coco.names beside an ONNX "
        "export; our checkpoints and the model.onnx `shitu detect-train` writes carry their "
        "own)",
    )
    runtimes = ("auto", "torch", "onnxruntime")
    parser.add_argument(
        "--runtime",
        default="auto",
        choices=runtimes,
        help="runtime of the detector: auto (default: onnxruntime for an .onnx file, else torch), "
        "torch or onnxruntime",
    )
    # Its name before it was called --runtime, as on every other command; scripts use it.
    parser.add_argument("--backend", dest="runtime", choices=runtimes, help=argparse.SUPPRESS)
    parser.add_argument(
        "--input-size",
        type=input_side,
        help="network input size, a multiple of 32 (default: the model's own: an ONNX file's "
        "fixed size, a detect-train model.pt's --input-size, a .pdparams's architecture's); "
        "another size for an ONNX file needs --runtime torch",
    )
    parser.add_argument(
        "--threshold", type=detection_score, default=0.3, help="minimum score (default 0.3)"
    )
    parser.add_argument(
        "--max-boxes", type=positive_int, default=5, help="boxes kept per image (default 5)"
    )
    parser.add_argument(
        "--per-class", action="store_true", help="NMS per class instead of class-agnostic"
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        help="CPU threads for the detector (default: the runtime's, one per core)",
    )
    add_visualisation_arguments(parser)
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def _class_names(path: str) -> tuple[str, ...]:
    """The names of a --class-names file, line n naming class n-1; a DataError for one
    that cannot be read, said as for the other listing files (`read_listing_text`)."""
    try:
        text = read_listing_text(path, f"--class-names {path}")
    except UnicodeDecodeError:
        reason = undecodable_text_reason(path, "a text file of names")
        raise DataError(f"--class-names {path}: {reason}") from None
    lines = text_lines(text)
    names = [line.strip() for line in lines]
    while names and not names[-1]:  # trailing blank lines name nothing
        names.pop()
    if "" in names:  # dropping it would give every later class the name of the next one
        raise DataError(
            f"--class-names {path}: line {names.index('') + 1} is blank; a name's line number "
            "is its class number, so each class needs a name"
        )
    return tuple(names)


def refuse_recognition_export(model: str, option: str) -> None:
    """A ConfigError for a recognition model's export folder, or a file of one, given as
    the detector: the folder was said to "hold model.onnx", and that file was then refused
    for outputs that are no detector's."""
    from shitu.inference.manifest import EXPORT_FILES, MANIFEST

    path = Path(model)
    export = path if path.is_dir() else path.parent if path.name in EXPORT_FILES else None
    if export is not None and (export / MANIFEST).is_file():
        part = "" if export == path else "a file of "
        raise ConfigError(
            f"{option} {model} is {part}an exported recognition model ({export} holds "
            f"{MANIFEST}), not a detector; give a detector: the model.pt or model.onnx `shitu "
            "detect-train` writes, a PaddleDetection .pdparams or a PicoDet ONNX export"
        )


def run(args: argparse.Namespace) -> int:
    with removed_if_left_empty(args.save_vis):  # a run that fails leaves no folder made
        return _detect(args)


def _detect(args: argparse.Namespace) -> int:
    from shitu.data.transforms.ops import UnreadableImageError
    from shitu.detection import load_detector
    from shitu.inference.preprocess import read_rgb
    from shitu.pipeline import draw_boxes
    from shitu.pipeline.defaults import PLAIN_BACKGROUND
    from shitu.progress import ImageProgress

    if not args.model:  # `--model "$DET"` unset: Path("") is the working directory
        raise ConfigError("--model: empty; give a detector file (.pt, .pdparams or .onnx)")
    if args.model == PLAIN_BACKGROUND and not os.path.exists(args.model):
        # recognize's --detector names it so; "detector file not found" left the user to
        # find that it is no file
        raise ConfigError(
            f"--model {PLAIN_BACKGROUND}: detect runs a detector model file (.pt, .pdparams or "
            f".onnx); {PLAIN_BACKGROUND} is `shitu recognize`'s model-free detector, whose "
            f"boxes `shitu recognize PHOTOS --gallery LIB --detector {PLAIN_BACKGROUND} "
            "--save-vis DIR` draws"
        )
    refuse_recognition_export(args.model, "--model")
    paths, folder = expand_images(args.images)
    detector = load_detector(args.model, args.runtime, args.arch, args.input_size, args.threads)
    names = _class_names(args.class_names) if args.class_names else detector.class_names
    if args.class_names and detector.num_classes not in (None, len(names)):
        raise DataError(
            f"--class-names {args.class_names}: {len(names)} names, but the detector scores "
            f"{detector.num_classes} classes"
        )
    writer = visualisation_writer(args, paths)
    progress = progress_wanted(args) and (folder or len(paths) > 1)  # as `shitu recognize`
    with ImageProgress(len(paths), progress, "detecting") as bar:
        for path in map(str, paths):
            try:
                image = read_rgb(path)
            except UnreadableImageError as exc:
                reason = skip_reason(str(exc), "detect", path)
                print_past_progress(f"warning: skipped {path}: {reason}", sys.stderr)
                bar.skip()
                continue
            dets = detector.detect(image, args.threshold, args.max_boxes, not args.per_class)
            boxes = [
                {
                    "cls": int(c),
                    **({"label": names[int(c)]} if int(c) < len(names) else {}),
                    "score": round(float(s), 5),
                    "box": [round(float(v), 2) for v in box],
                }
                for c, s, *box in dets
            ]
            record = {"image": path, "width": image.shape[1], "height": image.shape[0]}
            print_past_progress(json.dumps({**record, "boxes": boxes}, ensure_ascii=False))
            if writer is not None:
                drawn = ((b["box"], b.get("label", f"class {b['cls']}"), b["score"]) for b in boxes)
                writer.save(path, draw_boxes(image, drawn, writer.fonts))
            bar.update(1)
    if writer is not None:
        writer.note_replaced()
    return unread_files_status(bar.skipped, len(paths))  # none read: fail, like recognize
