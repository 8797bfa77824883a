"""`shitu demo`: the whole system on generated product photos, offline, in one command."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from shitu.cli.common import VisualisationWriter, given_output_path
from shitu.cli.recognize import (
    add_pipeline_arguments,
    format_table,
    naming_config_paths,
    pipeline_arguments,
    pipeline_config_from_args,
)
from shitu.errors import ShituError
from shitu.fileio import check_writable
from shitu.pipeline.defaults import PLAIN_BACKGROUND

if TYPE_CHECKING:
    from shitu.inference import FeatureExtractor
    from shitu.pipeline import PipelineConfig
    from shitu.pipeline.recognizer import MainbodyDetector

MARKER = ".shitu-demo"
DEFAULT_OUT = "shitu-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build a gallery of demo products and recognise demo photos (works offline)",
        description=(
            "Generates photos of invented grocery products, builds a gallery library from "
            "three views of each with the shipped model (or --model), recognises new photos "
            "(single products and shelves of several) and writes annotated images to OUT/vis. "
            "The detector "
            "defaults to 'plain-background' here, so every product on a shelf is found."
        ),
    )
    parser.add_argument(
        "--out",
        type=_out_folder,
        default=DEFAULT_OUT,
        help=f"output folder (default {DEFAULT_OUT})",
    )
    add_pipeline_arguments(parser, gallery=False, default_detector=PLAIN_BACKGROUND)
    parser.set_defaults(func=run)


def _out_folder(text: str) -> Path:
    """--out; '' (`--out "$OUT"` of an unset variable) is none given, the default folder,
    not Path(''): the working directory, which the demo would fill (an empty one) or refuse."""
    return given_output_path(text) or Path(DEFAULT_OUT)


def _prepare(out: Path) -> None:
    """Refuse a folder that holds anything but an earlier demo; clear an earlier library."""
    check_writable(out, f"--out {out}")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise ShituError(f"{out}: exists and is not a shitu demo folder; choose another --out")
    (out / MARKER).touch()
    shutil.rmtree(out / "gallery", ignore_errors=True)


def demo_settings(args: argparse.Namespace) -> tuple[PipelineConfig, str]:
    """The pipeline config of the demo's recognition, and the `shitu recognize` command
    that recognises the user's photos with the same config (the settings given to the
    demo repeated, and what the demo itself sets: its library and detector)."""
    config = pipeline_config_from_args(args)
    gallery = str(args.out / "gallery")
    config.IndexProcess.index_dir = gallery
    same = ["--gallery", gallery, *pipeline_arguments(args)]
    if args.detector is None and config.detector is None:  # `--detector none` stays
        config.Global.det_inference_model_dir = PLAIN_BACKGROUND
        same += ["--detector", PLAIN_BACKGROUND]  # recognize's own default is none
    command = ["shitu", "recognize", "YOUR_PHOTOS", *same]
    command += ["--format", "table", "--save-vis", str(args.out / "vis_yours")]
    return config, shlex.join(command)


def _under(out: Path, path: Path) -> str:
    """A demo photo's path under --out as given (relative, say), as the lines naming the
    demo's folders show it, not resolved as a label list's paths are."""
    return str(out / path.resolve().relative_to(out.resolve()))


def run(args: argparse.Namespace) -> int:
    from shitu.pipeline.recognizer import build_detector, load_extractor

    config, next_command = demo_settings(args)
    # The model and the detector first: a setting that cannot work leaves nothing written.
    # Both stay loaded: the model builds the library, then the recogniser uses them.
    with contextlib.ExitStack() as held:
        with naming_config_paths(args, config):
            extractor = held.enter_context(load_extractor(config))
            detector = build_detector(config)
            if isinstance(detector, contextlib.AbstractContextManager):
                held.enter_context(detector)
        return _recognise_demo(args, config, extractor, detector, next_command)


def _recognise_demo(
    args: argparse.Namespace,
    config: PipelineConfig,
    extractor: FeatureExtractor,
    detector: MainbodyDetector | None,
    next_command: str,
) -> int:
    """Write the demo photos, build their library and recognise the query photos with
    `extractor` and `detector`, the config's model and detector."""
    from shitu.demo import make_demo_set
    from shitu.index import Gallery, collect_items
    from shitu.pipeline import Recognizer

    out: Path = args.out
    _prepare(out)
    demo = make_demo_set(out / "images")
    print(f"demo photos written to {out / 'images'}")

    items = collect_items([demo.gallery_list])
    with Gallery.create_for(out / "gallery", extractor) as gallery:
        gallery.add_files(extractor, items, batch_size=config.Global.batch_size)
        labels = len({item.label for item in items})
        print(f"gallery library {out / 'gallery'}: {len(gallery)} images of {labels} products\n")

    queries = collect_items([demo.queries_list])
    expected = {_under(out, item.path): [item.label] for item in queries}
    expected.update({_under(out, path): labels for path, labels in demo.shelves})
    writer = VisualisationWriter(out / "vis")
    found_right = total = 0
    with Recognizer.from_config(config, extractor=extractor, detector=detector) as recognizer:
        for found in recognizer.recognize_files(list(expected), keep_images=True):
            truth = expected[found.path]
            print(format_table(found))
            print(f"  expected: {', '.join(truth)}\n")
            found_right += len(set(truth) & {r.label for r in found.results})
            total += len(truth)
            writer.save_recognition(found)
    print(f"recognised {found_right} of {total} products; annotated photos in {out / 'vis'}")
    print(f"next: {next_command}")
    return 0
