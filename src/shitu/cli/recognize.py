"""`shitu recognize`: what is in these photos? Detect, embed, search a gallery library."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shitu.cli.common import (
    add_override_argument,
    add_progress_argument,
    add_runtime_arguments,
    add_visualisation_arguments,
    cosine_similarity,
    display_width,
    expand_images,
    print_past_progress,
    progress_wanted,
    skip_reason,
    table_field,
    thread_count,
    unread_files_status,
    visualisation_writer,
    warn_if_empty,
)
from shitu.errors import CheckpointError, ConfigError, GalleryError, ShituError
from shitu.fileio import is_url, removed_if_left_empty
from shitu.pipeline.defaults import (
    DEFAULT_PIPELINE_CONFIG,
    DEFAULT_SCORE_THRES,
    NO_DETECTOR,
    PIPELINE_CONFIG_DIR,
    SETTINGS,
)

if TYPE_CHECKING:
    from shitu.pipeline import FileRecognition, PipelineConfig


def add_pipeline_arguments(
    parser: argparse.ArgumentParser, gallery: bool = True, default_detector: str = NO_DETECTOR
) -> None:
    """Config file, overrides and the flags that set its most used keys."""
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_PIPELINE_CONFIG,
        help="pipeline YAML (PaddleClas inference_general.yaml shape) or a shipped name "
        f"(default: {DEFAULT_PIPELINE_CONFIG})",
    )
    add_override_argument(parser, "-o IndexProcess.score_thres=0.6")
    if gallery:
        parser.add_argument(
            "--gallery",
            help="gallery library folder (`shitu index build --out`; default: the config's "
            "IndexProcess.index_dir)",
        )
    parser.add_argument(
        "--model", help="exported model folder (default: the model shipped with shitu)"
    )
    parser.add_argument(
        "--detector",
        help="mainbody detector: a .onnx/.pdparams/.pt file, 'plain-background' (objects on "
        "a uniform surface, no model needed) or 'none' (whole image only); default: the "
        f"config's detector, else {default_detector!r}",
    )
    parser.add_argument("--det-arch", help="detector architecture name (for .pdparams)")
    parser.add_argument(
        "--score-thres",
        type=cosine_similarity,
        help="cosine similarity a result needs (default: the config's "
        "IndexProcess.score_thres, else the model's calibrated threshold, else "
        f"{DEFAULT_SCORE_THRES})",
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        help="CPU threads for the recognition model and the detector (default: the config's "
        "Global.cpu_num_threads, else the runtime's)",
    )
    add_runtime_arguments(parser)


def pipeline_config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The config file with -o overrides, then the explicit flags on top."""
    from shitu.pipeline.config import load_pipeline_config, with_settings

    overrides = [item for group in args.override for item in group]
    config = load_pipeline_config(args.config, overrides)
    # Each flag by its argparse dest; `demo` has no --gallery.
    return with_settings(config, {name: getattr(args, name, None) for name in SETTINGS})


@contextlib.contextmanager
def naming_config_paths(args: argparse.Namespace, config: PipelineConfig) -> Iterator[None]:
    """A library, model or detector that cannot be opened (no such folder or file, not a
    library, another model's), named with the config file (or -o override) its path came
    from where its flag did not give it: a path read from a file the user may not have in
    mind says neither, nor that a relative one is taken from the working directory."""
    from shitu.config.loader import find_config, with_source
    from shitu.config.overrides import override_paths

    try:
        yield
    except ShituError as exc:
        flag, problem = _opened_path_problem(exc)
        if flag is None or getattr(args, flag, None) is not None:
            raise
        section, key = SETTINGS[flag]
        given = getattr(getattr(config, section), key) or ""
        relative = not (Path(given).is_absolute() or is_url(given))  # a URL is none
        note = f" (read from the working directory {Path.cwd()})" if relative else ""
        source = find_config(args.config, PIPELINE_CONFIG_DIR, "pipeline config")
        overrides = override_paths([item for group in args.override for item in group])
        # Its kind, not its class: a ModelMismatchError is made with more than a message.
        kind = next(
            k
            for k in (GalleryError, CheckpointError, ConfigError, ShituError)
            if isinstance(exc, k)
        )
        raise kind(with_source(source, f"{problem}{note}", overrides)) from None


def _opened_path_problem(exc: ShituError) -> tuple[str | None, str]:
    """The flag (a SETTINGS name) of the path the pipeline failed to open, and the problem
    starting with its config key; (None, "") for another error. The model's and the
    detector's say their key and flag, `KEY (--FLAG): `: where no flag gave the path, the
    key alone."""
    if isinstance(exc, GalleryError):
        return "gallery", f"{'.'.join(SETTINGS['gallery'])}: {exc}"
    flag = next((f for f in ("model", "detector") if ".".join(SETTINGS[f]) == exc.setting), None)
    if flag is None or exc.problem is None:
        return None, ""
    return flag, f"{exc.setting}: {exc.problem}"


def pipeline_arguments(args: argparse.Namespace) -> list[str]:
    """The words that give `args`'s pipeline settings to another command (the config,
    its overrides and the flags, as given), e.g. for a hint to repeat a run."""
    words = [] if args.config == DEFAULT_PIPELINE_CONFIG else ["-c", args.config]
    words += [word for group in args.override for item in group for word in ("-o", item)]
    for dest in SETTINGS:
        value = getattr(args, dest, None)
        if value is not None:
            words += [f"--{dest.replace('_', '-')}", str(value)]
    return words


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recognize",
        help="recognise the objects in photos against a gallery library",
        description=(
            "For each image: mainbody boxes from the detector (none: the whole image), crops "
            "embedded in one batch, each box labelled by its best gallery hit if the score "
            "passes the threshold, overlapping results reduced by NMS. Prints one JSON line "
            "per image (or a table); an image that cannot be read gets no JSON line, a warning "
            "on stderr names it (the table lists it as skipped). Folders are searched for "
            "images."
        ),
    )
    parser.add_argument("images", nargs="+", help="image files and/or folders")
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--format",
        choices=("jsonl", "table"),
        default="jsonl",
        help="jsonl: a JSON object per image, a line each; table: a block per image to read",
    )
    add_visualisation_arguments(parser)
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def format_table(found: FileRecognition) -> str:
    """A block per image: path, then score, label, box and gallery id per result. The path
    is a line of its own, quoted as `index list` quotes one (`table_field`) where a file
    named with a line break or tab would split it."""
    path = table_field(found.path)
    if found.error is not None:
        return f"{path}\n  skipped: {found.error}"
    if not found.results:
        return f"{path}\n  (nothing recognised)"
    width = max(display_width(r.label) for r in found.results)
    rows = [
        f"  {r.score:6.3f}  {r.label}{' ' * (width - display_width(r.label))}  "
        f"[{', '.join(map(str, r.bbox))}]  id {r.image_id}"
        for r in found.results
    ]
    return "\n".join([path, *rows])


def run(args: argparse.Namespace) -> int:
    with removed_if_left_empty(args.save_vis):  # a run that fails leaves no folder made
        return _recognize(args)


def _recognize(args: argparse.Namespace) -> int:
    from shitu.pipeline import Recognizer

    paths, folder = expand_images(
        args.images, {"a gallery library": "--gallery", "an exported model": "--model"}
    )
    config = pipeline_config_from_args(args)
    writer = visualisation_writer(args, paths)
    progress = progress_wanted(args) and (folder or len(paths) > 1)
    skipped = 0
    with naming_config_paths(args, config):
        recognizer = Recognizer.from_config(config)
    with recognizer:
        if writer is not None:
            writer.refuse_gallery_sources(recognizer.gallery)
        warn_if_empty(recognizer.gallery, "nothing can be recognised")
        drawn = writer is not None  # drawn on the photos decoded for recognition
        for found in recognizer.recognize_files(paths, progress=progress, keep_images=drawn):
            if found.error is not None:
                skipped += 1
                reason = skip_reason(found.error, "recognize", found.path)
                print_past_progress(f"warning: skipped {found.path}: {reason}", sys.stderr)
                if args.format == "jsonl":
                    continue
            if args.format == "jsonl":
                print_past_progress(json.dumps(found.to_dict(), ensure_ascii=False))
            else:
                print_past_progress(format_table(found))
            if writer is not None and found.error is None:
                writer.save_recognition(found)
    if writer is not None:
        writer.note_replaced()
    return unread_files_status(skipped, len(paths))  # none read: fail, like extract
