"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import math
import os
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from shitu.detection.input_size import check_input_size
from shitu.errors import CheckpointError, ConfigError, DataError, ShituError, override_word
from shitu.fileio import (
    check_writable,
    folder_place,
    home_expanded,
    is_url,
    name_within,
    refuse_file_in_the_way,
    refuse_url,
    temporary_prefix,
    write_jpeg,
)
from shitu.image_files import IMAGE_SUFFIXES, LABELLED_LIST_HINT, TEXT_FILE_REASON, scan_images
from shitu.inference.choices import BACKENDS, PRECISIONS
from shitu.runtime import MAX_THREADS

if TYPE_CHECKING:
    from PIL import Image

    from shitu.config import ShituConfig
    from shitu.index import Catalog, Gallery
    from shitu.models import RecModel
    from shitu.pipeline import FileRecognition

DEFAULT_CONFIG = "GeneralRecognitionV2_PPLCNetV2_base"
JPEG_MAX_SIDE = 65_500  # pixels: the longest side libjpeg (Pillow's JPEG encoder) writes


# The largest whole number an option takes: numpy and torch hold them as int64.
LARGEST_WHOLE_NUMBER = 2**63 - 1


def bounded(kind: type, low: float, high: float | None, what: str) -> Callable[[str], Any]:
    """An argparse type that parses `kind` and checks low <= value (<= high). NaN and
    infinity parse as floats but are refused: no limit or setting can use them; so are
    whole numbers beyond int64 (`LARGEST_WHOLE_NUMBER`), which numpy and torch cannot
    hold (one of 400 digits was an OverflowError's traceback)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, int) and abs(value) > LARGEST_WHOLE_NUMBER:
            digits = len(str(abs(value)))
            given = value if digits <= 24 else f"a number of {digits} digits"
            raise argparse.ArgumentTypeError(
                f"expected {what}, got {given}, beyond the largest one taken "
                f"({LARGEST_WHOLE_NUMBER})"
            )
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


finite_float = bounded(float, -math.inf, None, "a finite number")
positive_int = bounded(int, 1, None, "a whole number >= 1")
thread_count = bounded(int, 1, MAX_THREADS, f"a thread count from 1 to {MAX_THREADS}")
non_negative_int = bounded(int, 0, None, "a whole number >= 0")
positive_float = bounded(float, 1e-12, None, "a number above 0")
positive_minutes = bounded(float, 1e-9, None, "a number of minutes above 0")
port_number = bounded(int, 0, 65535, "a port number from 0 to 65535")
cosine_similarity = bounded(float, -1.0, 1.0, "a cosine similarity from -1 to 1")
detection_score = bounded(float, 0.0, 1.0, "a score from 0 to 1")


def given_path(text: str) -> Path | None:
    """A path option's value; '' (`--save-vis "$VIS"` of an unset variable) is none given,
    as an empty --detector or --model is, not Path(''): the working directory, where the
    option's files would then go. A URL is refused, as `required_path` refuses it."""
    return required_path(text) if text else None


def required_path(text: str) -> Path:
    """A path that must be given (an image source, a library, a required --out); '' (`"$LIB"`
    of an unset variable) is refused, named by argparse (`argument --out: empty; give a
    path`), not taken for Path(''): the working directory, which would be scanned, opened
    or written as that argument."""
    if not text:
        raise argparse.ArgumentTypeError("empty; give a path")
    try:  # now: Path() reads `https://host/a.jpg` as the missing file `https:/host/a.jpg`
        refuse_url(text, "files")
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return Path(text)


def output_path(text: str) -> Path:
    """A path to write (an --out), refused as `required_path` refuses a path to read, but
    for a URL: no download to advise, shitu writes local files only (Path() would read
    `https://host/out` as the local folder `https:/host/out` and write there)."""
    if is_url(text):
        raise argparse.ArgumentTypeError(
            f"{text} is a URL, and shitu writes only to local files and folders: give a "
            "local path (and upload what it writes yourself)"
        )
    return required_path(text)


def given_output_path(text: str) -> Path | None:
    """An optional path to write: '' is none given, as `given_path` takes it."""
    return output_path(text) if text else None


def add_runtime_arguments(parser: argparse.ArgumentParser, gpu: bool = False) -> None:
    """--runtime and --precision for commands that embed images (None when not given:
    auto and fp32). fp16 and bf16 run on a GPU only: offered where the command has a
    --device option (`gpu`)."""
    parser.add_argument(
        "--runtime",
        choices=BACKENDS,
        help="runtime of the recognition model: auto (default: onnxruntime, else torch), "
        "onnxruntime, openvino (pip install 'shitu[openvino]'; often faster on x86 CPUs, the same "
        "features) or torch",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS if gpu else ("fp32", "int8"),
        help="fp32 (default); int8: the export's model.int8.onnx (`shitu export "
        "--int8-calibration IMAGES`), the fastest CPU path"
        + ("; fp16/bf16: torch on a GPU (--device cuda)" if gpu else "")
        + ". Features differ between precisions, so a gallery is searched in the precision "
        "it was built in",
    )


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """--no-progress, the same on each command that draws a progress bar."""
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (none is drawn either where stderr is not a terminal)",
    )


def add_leaf_labels_argument(parser: argparse.ArgumentParser) -> None:
    """--leaf-labels, for commands that read folder-per-label trees (`collect_items`)."""
    parser.add_argument(
        "--leaf-labels",
        action="store_true",
        help="label each image of a folder by the folder it is in "
        "(Fruit/Apple/Golden-Delicious/1.jpg: Golden-Delicious), not by the first-level "
        "folder (Fruit): for trees grouped by category",
    )


def add_detector_arch_argument(parser: argparse.ArgumentParser, *names: str) -> None:
    """The .pdparams detector's architecture as `args.arch`, under `names`: the command's
    own name first (its usage shows that one), then the other commands' name for it."""
    parser.add_argument(
        *names,
        dest="arch",
        help="architecture name (needed for .pdparams), as recognize's --det-arch",
    )


def progress_wanted(args: argparse.Namespace) -> bool:
    """Whether to draw a progress bar on stderr: not with --no-progress, and not where
    stderr is a file or a pipe (`2> log`, a job runner), whose log would fill with the
    bar's carriage-return redraws."""
    return not args.no_progress and sys.stderr.isatty()


def print_past_progress(text: str, file: TextIO | None = None) -> None:
    """Print `text` (flushed, to stdout by default) while a progress bar may be drawn: on a
    terminal, where results and the bar share the screen, the bar is cleared first and
    drawn again below, so that a line does not continue the bar's."""
    from tqdm import tqdm

    file = file or sys.stdout
    with tqdm.external_write_mode(file=file):
        print(text, file=file, flush=True)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    head_option: bool = True,
    default: str | None = DEFAULT_CONFIG,
    without: str = "",
) -> None:
    """`-c CONFIG` and `-o`; `default` None for a command that reads a config only when -c
    names one, or that does what `without` says when it does not. `args.config` is None
    without -c: `config_from_args` then reads `default` and says so."""
    shown = f" (default: {default})" if default else f" (default: {without})" if without else ""
    parser.add_argument(
        "-c", "--config", help=f"YAML config file, or the name of a shipped config{shown}"
    )
    parser.set_defaults(default_config=default)
    add_override_argument(parser, "-o Global.epochs=10 -o Arch.Head.class_num=81")
    if head_option:
        parser.add_argument(
            "--no-head",
            action="store_true",
            help="leave out the classification head (feature extraction needs none)",
        )


def add_override_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """`-o KEY=VALUE ...`, repeatable, for training and pipeline configs alike."""
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. {example} (repeatable; values are parsed as "
        "YAML; list items as key[0] or key.0; KEY=null gives the key its default)",
    )


OVERRIDE_FLAGS = ("-o", "--override")


def separate_overrides(argv: list[str]) -> list[str]:
    """`argv` with each `-o` value written as `--override=VALUE`: the word after `-o` and
    the `KEY=VALUE` words that follow it. argparse would also give `-o` (nargs '+') the
    positional words after them (`shitu recognize -o A=1 photo.jpg`), then report those
    as missing."""
    result: list[str] = []
    flag: str | None = None  # the `-o` whose values are being read; `first` until it has one
    first = False
    for index, word in enumerate(argv):
        if word == "--":
            return result + ([flag] if first else []) + argv[index:]
        if word in OVERRIDE_FLAGS:
            if first:
                result.append(flag)  # an `-o` without a value: argparse names it
            flag, first = word, True
            continue
        if flag is not None and not word.startswith("-") and (first or "=" in word):
            result.append(f"--override={word}")
            first = False
            continue
        if first:
            result.append(flag)
        flag, first = None, False
        result.append(word)
    return result + ([flag] if first else [])


def expand_home_in_option_values(argv: list[str]) -> list[str]:
    """`argv` with the `~` that starts an `--option=VALUE` (or `-c=VALUE`) value expanded to
    the home folder, as the shell expands `--option ~/path` but not `--option=~/path` (the
    word is no variable assignment): `--save-vis=~/vis` made a folder named `~` in the
    working directory. Words after `--` are positionals, left as they are."""
    expanded: list[str] = []
    for index, word in enumerate(argv):
        if word == "--":
            return expanded + argv[index:]
        option, sep, value = word.partition("=")
        if sep and (word.startswith("--") or _is_short_option(option)):
            word = f"{option}={home_expanded(value)}"
        expanded.append(word)
    return expanded


def _is_short_option(word: str) -> bool:
    """`-c`, which argparse also takes as `-c=VALUE`."""
    return len(word) == 2 and word[0] == "-" and word[1].isalpha()


# What a training run leaves in its output_dir, the one to evaluate or export first.
TRAINED_WEIGHTS = ("best_model.safetensors", "final_model.safetensors")


def trained_weights(config: ShituConfig, doing: str) -> str | None:
    """`Global.pretrained_model`; without it, a note that `doing` uses the model as the
    config initialises it, and where a training run of this config leaves its weights.
    `Global.checkpoints` alone is refused: it names trained weights, which would be
    left unused (it only resumes training)."""
    weights = config.Global.pretrained_model
    checkpoint = config.Global.checkpoints
    if not weights and checkpoint:
        raise ConfigError(
            f"Global.checkpoints {checkpoint}: only shitu train reads it (to resume); give "
            "the weights as -o Global.pretrained_model=FILE (the run's best_model.safetensors "
            "or final_model.safetensors)"
        )
    if not weights:
        output = Path(config.Global.output_dir)
        written = [output / name for name in TRAINED_WEIGHTS if (output / name).is_file()]
        trained = (  # only a file that is there: no run of this config may have ended yet
            f"-o {override_word('Global.pretrained_model', written[0])} (or any weights file)"
            if written
            else f"-o Global.pretrained_model=FILE (none in {output} yet: a shitu train run "
            f"of this config writes its {TRAINED_WEIGHTS[0]} there)"
        )
        print(
            f"note: no Global.pretrained_model, so {doing} the model as the config initialises "
            f"it: {config.Arch.initialisation()}; pass {trained} for trained weights",
            file=sys.stderr,
        )
    return weights


def config_from_args(
    args: argparse.Namespace, needs: Callable[[ShituConfig], None] | None = None
) -> ShituConfig:
    """The config of `-c` and `-o`. `needs` checks the sections the command needs (training
    or evaluation data), before any model is built; its ConfigError names the file."""
    from shitu.config import load_config, resolve_config_path
    from shitu.config.loader import with_source
    from shitu.config.overrides import override_paths

    if args.config is None:
        args.config = args.default_config
        _say_default_config(args.config)
    _refuse_an_export(args.config)
    overrides = [item for group in args.override for item in group]
    config = load_config(args.config, overrides)
    if needs is not None:
        try:
            needs(config)
        except ConfigError as exc:
            path = resolve_config_path(args.config)
            raise ConfigError(with_source(path, str(exc), override_paths(overrides))) from None
    if getattr(args, "no_head", False):
        config.Arch.Head = None
    return config


def _refuse_an_export(given: str) -> None:
    """A ConfigError where `-c` names an exported model's folder or its manifest: taken for
    a config, the folder was "a folder, not a YAML file" and the manifest, JSON and so YAML,
    a list of its 17 entries as unknown config keys, neither saying what was given."""
    from shitu.inference.manifest import MANIFEST, TORCH_FILE

    path = Path(given)
    folder = path if path.is_dir() else path.parent if path.name == MANIFEST else None
    if folder is not None and (folder / MANIFEST).is_file():
        raise ConfigError(
            f"-c {given}: an exported model (its {MANIFEST}), not a training config: give the "
            f"config it was exported from, with -o Global.pretrained_model={folder / TORCH_FILE} "
            "for its weights (they hold no head: --no-head where the command takes it); "
            f"`--model {folder}` runs the export itself (extract, recognize, index)"
        )


def _say_default_config(name: str) -> None:
    """Name the config a command reads without -c: its errors (a dataset path of its own,
    not the user's) and its model (not the shipped one) were otherwise unexplained."""
    from shitu.engine.distributed import launched_rank
    from shitu.inference.default_model import DEFAULT_MODEL_CONFIG

    if launched_rank() == 0:  # once under torchrun
        print(
            f"note: no -c, so the shipped config {name} (PP-ShiTuV2's recipe; the shipped "
            f"model's is {DEFAULT_MODEL_CONFIG}); give -c CONFIG for your own",
            file=sys.stderr,
        )


def arch_of_model(config: ShituConfig) -> dict[str, Any]:
    """The Arch settings (JSON data) of the model a command builds, for a weight file's
    recorded ones to be compared with (`load_weights`'s `arch`): a file that does not fit
    then names the settings that differ. Without the Head where the model has none
    (`--no-head`), the file's head being left out."""
    return config.Arch.model_dump(
        mode="json", exclude={"Head"} if config.Arch.Head is None else None
    )


def model_from_config(
    config: ShituConfig, args: argparse.Namespace, pretrained: bool = True
) -> RecModel:
    """Build the config's model; problems only found while building still name the file.

    pretrained=False: a checkpoint with every weight is loaded next (see `build_model`).
    """
    from shitu.config import resolve_config_path
    from shitu.models import build_model

    try:
        return build_model(config.Arch, pretrained)
    except ConfigError as exc:
        raise ConfigError(f"{resolve_config_path(args.config)}: {exc}") from None


def count_parameters(module: object) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def expand_images(
    sources: Iterable[str], options: Mapping[str, str] | None = None
) -> tuple[list[Path], bool]:
    """Files as given, folders as the images in them (a folder without any is an error);
    also whether a folder was given. A gallery library's or an exported model's folder is
    refused, named as such (and with the command's option for it in `options`, by kind,
    e.g. {"a gallery library": "--gallery"}), rather than scanned to no images; one inside
    a folder given is skipped, as its files are not the photos the folder is of."""
    paths: list[Path] = []
    folder = False
    for given in sources:
        if not given:  # "$PHOTO" of an unset variable: Path("") is the working directory
            raise DataError("an empty path was given: name image files or folders")
        refuse_url(given, "images")
        source = Path(given)
        if source.is_dir():
            folder = True
            owner = owned_folder(source)
            if owner is not None:
                option = (options or {}).get(owner[1])
                raise DataError(
                    f"{source}: {owner[1]} (it holds {owner[0]}), not a folder of images"
                    + (f"; give it with {option}" if option else "")
                )
            paths.extend(scan_images(source, foreign=_owned_kinds()))
        elif source.exists() or source.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(source)  # missing files are reported per file, not fatal
        else:
            raise DataError(f"{source}: no such file or folder")
    return paths, folder


def weights_folder(out: str | Path) -> Path:
    """The folder the weight file `out` is written in: where a link there points
    (`folder_place`), for `removed_if_left_empty` to remove it where the command made it
    and then failed; a link in a loop (refused by `writable_weights_file`): its own."""
    try:
        return folder_place(out).parent
    except OSError:
        return Path(out).parent


def writable_weights_file(out: str | Path) -> Path:
    """`out`, an output weight file, once `save_weights` could write it there: its name
    (`check_weights_name`), no folder of that name, a folder it can be made in (its
    folders are made now: run the command in `removed_if_left_empty`). Checked before
    the inputs are read, merged or converted, with the message `save_weights` would give
    after that work. Not into a gallery library's or an export's folder (`owned_folder`):
    written over an export's own model.safetensors, the export no longer loaded. All of it
    where a symbolic link `out` points, as `save_weights` writes there (`folder_place`)."""
    from shitu.checkpoint.io import check_weights_name

    path = check_weights_name(out)
    try:
        place = folder_place(path)
    except OSError as exc:  # a link in a loop
        raise CheckpointError(f"cannot write {path}: {exc.strerror}") from None
    refuse_file_in_the_way(place.parent, f"--out {out}")  # named, not 'File exists'
    refuse_owned_output(place.parent, f"--out {out}", "the weights", CheckpointError)
    try:
        if place.is_dir():  # `save_weights` renames its file onto it only at the end
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        place.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=temporary_prefix(place.name), dir=place.parent):
            pass
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def warn_if_empty(gallery: Gallery, outcome: str) -> None:
    """Warn that `gallery` holds no images (all removed), with the `outcome` for the
    command ("nothing can be recognised"): else each answer is a silent "nothing"."""
    if not len(gallery):
        print(f"warning: {gallery.root} holds no images: {outcome}", file=sys.stderr)


def unread_files_status(unread: int, total: int) -> int:
    """Say how many of the `total` files given could not be read (each was named as it was
    skipped); the command's exit status: 1 where none could be, else 0."""
    if unread:
        counted = "the only file" if total == 1 else f"{unread} of {total} files"
        print(f"warning: {counted} could not be read", file=sys.stderr)
    return 1 if unread == total else 0


def skip_reason(reason: str, command: str, path: str | Path) -> str:
    """Why `command` skipped the file `path`, and where a text file given as an image
    (usually a labelled list, `photos.txt`) belongs. Text named as an image (`photo.jpg`
    that is an HTML error page a download saved) is no list: the reason alone says it."""
    if TEXT_FILE_REASON not in reason or Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return reason
    return f"{reason} ({command} takes image files and folders; {LABELLED_LIST_HINT})"


def input_side(text: str) -> int:
    """A detector input side (`check_input_size`: a positive multiple of 32)."""
    try:
        return check_input_size(int(text))
    except (ValueError, ConfigError):
        message = f"expected a positive multiple of 32, got {text}"
        raise argparse.ArgumentTypeError(message) from None


def display_width(text: str) -> int:
    """Terminal columns `text` takes: East Asian wide characters two, marks drawn on another
    character (accents, Thai and Devanagari vowel signs) and zero-width format characters
    none, so that labels in Chinese, Thai or with decomposed accents line up in a table."""
    return sum(
        0
        if unicodedata.category(char) in ("Mn", "Me", "Cf")
        else 2
        if unicodedata.east_asian_width(char) in "WF"
        else 1
        for char in text
    )


def print_summary(summary: dict[str, Any]) -> None:
    """What a long run is about to do, a `key  value` line each on stderr, before it starts:
    a wrong dataset or setting is seen at once, not hours later."""
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}", file=sys.stderr)


def table_field(text: str) -> str:
    """`text` as one field of a tab-separated line: as it is, unless it holds a tab, a line
    break or another control character (a file may be named so), or starts with a double
    quote; then as a JSON string (quoted, those characters escaped), as git quotes such
    paths, so that a reader splitting lines at tabs gets the fields, and `json.loads` the
    text of one that starts with a quote."""
    from shitu.index.labels import LINE_BREAKING, breaks_lines

    if not text.startswith('"') and not breaks_lines(text):
        return text
    quoted = json.dumps(text, ensure_ascii=False)  # escapes only U+0000 to U+001F
    return "".join(
        f"\\u{ord(char):04x}" if unicodedata.category(char) in LINE_BREAKING else char
        for char in quoted
    )


def count_of(count: int, noun: str) -> str:
    """'1 image', '2 images': counts in messages read as English."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _owned_kinds() -> dict[str, str]:
    """The files that make a folder a gallery library's (those `index build` skips too) or
    an exported model's, to what that makes it."""
    from shitu.index.labels import gallery_libraries
    from shitu.inference.manifest import MANIFEST

    return {**gallery_libraries(), MANIFEST: "an exported model"}


def refuse_owned_output(folder: Path, option: str, written: str, error: type[ShituError]) -> None:
    """An `error` where `option` would write `written` ("the weights") into `folder`, a
    gallery library's or an exported model's folder (`owned_folder`), whose files are its
    own (`shitu export` refuses to replace an export that holds others)."""
    owner = owned_folder(folder)
    if owner is not None:
        raise error(
            f"{option}: {folder} is {owner[1]}'s folder ({owner[0]}), whose files are its "
            f"own: write {written} to another folder"
        )


def owned_folder(folder: Path) -> tuple[str, str] | None:
    """The file that makes `folder` a gallery library's or an exported model's, and which
    of them ('a gallery library'), else None: a folder the other commands must not write
    their own files into, nor read as a folder of images."""
    return next(
        ((name, kind) for name, kind in _owned_kinds().items() if (folder / name).is_file()),
        None,
    )


def add_visualisation_arguments(parser: argparse.ArgumentParser) -> None:
    """--save-vis and --vis-font, the same on each command that draws its results."""
    parser.add_argument(
        "--save-vis",
        type=given_output_path,
        metavar="DIR",
        help="write copies of the images with boxes, labels and scores drawn here, as JPEG "
        "named after the images, in the sub-folders they have under the inputs' common folder",
    )
    parser.add_argument(
        "--vis-font",
        type=given_path,
        metavar="FILE",
        help="TrueType/OpenType font for the --save-vis captions (default: Pillow's own, and "
        "for labels it cannot draw, e.g. Chinese, an installed font that can)",
    )
    parser.add_argument(
        "--vis-font-index",
        type=non_negative_int,
        metavar="N",
        help="face of a --vis-font collection (.ttc) to draw with, counted from 0 (default "
        "0); e.g. NotoSansCJK-Regular.ttc holds JP, KR, SC, TC, HK: 2 draws Simplified "
        "Chinese forms",
    )


def visualisation_writer(
    args: argparse.Namespace, inputs: Iterable[Path]
) -> VisualisationWriter | None:
    """The writer that --save-vis and --vis-font ask for, None without --save-vis."""
    if args.vis_font_index is not None and args.vis_font is None:
        raise DataError(f"--vis-font-index {args.vis_font_index}: only used with --vis-font FILE")
    if args.save_vis is None:
        if args.vis_font is not None:
            raise DataError(f"--vis-font {args.vis_font}: only used with --save-vis DIR")
        return None
    scanned = [Path(source) for source in args.images if Path(source).is_dir()]
    font_index = args.vis_font_index or 0
    return VisualisationWriter(args.save_vis, inputs, args.vis_font, scanned, font_index)


class VisualisationWriter:
    """Saves annotated copies under one folder, each as JPEG named after its image, in the
    sub-folders the image has under the inputs' common folder (`photos/a/x.jpg` and
    `photos/b/x.jpg` -> `a/x.jpg`, `b/x.jpg`): photos from different folders often share
    names, and one copy must never replace another."""

    def __init__(
        self,
        folder: Path,
        inputs: Iterable[Path] = (),
        font: Path | None = None,
        scanned: Iterable[Path] = (),
        font_index: int = 0,
    ) -> None:
        """`inputs`: the images to annotate (others are named by their file name alone). A
        folder that a copy would be written to holding one of them is refused: the copies,
        named after the images, would write over the user's photos. `scanned`: the input
        folders, searched recursively for images; the folder may not be inside one, where
        the next run would take the copies for photos. `font`: the captions' font file
        (default: see CaptionFonts), `font_index` its face in a collection (.ttc). A gallery
        library's or an exported model's folder is refused: the copies are no part of it."""
        from shitu.pipeline import CaptionFonts

        self.fonts = CaptionFonts(font, font_index)
        self.folder = folder
        self.names: dict[str, Path] = {}  # absolute image path -> its copy, under `folder`
        self.used: set[str] = set()  # the copies' paths, case-folded (as some disks compare)
        self.written: set[Path] = set()
        self.replaced = 0  # files of these names already in the folder (an earlier run's)
        inputs = list(inputs)
        common = _common_folder(inputs)
        for image in inputs:
            self._copy_name(image, common)
        try:  # where a link there points, to make the folder there (mkdir of a link to one
            place = folder_place(folder)  # not made yet was "File exists")
        except OSError as exc:  # a link in a loop: resolve() was a RuntimeError's traceback
            raise DataError(f"--save-vis {folder}: {exc.strerror}") from None
        here = place.resolve()
        beside = {(here / name).parent for name in self.names.values()}
        inside = next((image for image in inputs if image.parent.resolve() in beside), None)
        if inside is not None:
            raise DataError(
                f"--save-vis {folder}: holds input images ({inside}), and the annotated "
                "copies take the images' names: choose another folder"
            )
        owner = owned_folder(folder)
        if owner is not None:
            raise DataError(
                f"--save-vis {folder}: is {owner[1]}'s folder, not one for annotated copies: "
                "choose another folder"
            )
        source = next((s for s in scanned if here.is_relative_to(s.resolve())), None)
        if source is not None:
            raise DataError(
                f"--save-vis {folder}: is inside the input folder {source}, where the next "
                "run would take the annotated copies for photos: choose a folder outside it"
            )
        # Made and written in now, not after the first photo; a file (or device) in the
        # way, or a place that refuses the folder, said as for every output folder.
        check_writable(folder, f"--save-vis {folder}")

    def refuse_gallery_sources(self, gallery: Gallery) -> None:
        """Refuse the folder where it is inside one that the searched `gallery`'s images
        came from (see `refuse_inside_gallery_sources`). Checked once the gallery is open;
        the folder made meanwhile is removed with the command's failure
        (`removed_if_left_empty`)."""
        refuse_inside_gallery_sources(self.folder, "--save-vis", gallery, "the annotated copies")

    def _copy_name(self, source: str | Path, common: Path | None) -> Path:
        """The copy's path under the folder, the same each time for one image: its path
        under `common` (its file name where None) as JPEG; where another image has that
        name (`x.jpg` beside `x.png`), its name with its suffix (`x.png.jpg`), then
        numbered (`x_2.jpg`). Each name is cut to fit NAME_MAX (`name_within`): an image's
        name of up to 255 bytes, with `.jpg` added, failed as "File name too long" and
        stopped the run at that image."""
        key = os.path.abspath(source)
        if key in self.names:
            return self.names[key]
        relative = Path(key).relative_to(common) if common else Path(Path(key).name)
        endings = itertools.chain(
            ((relative.stem, ".jpg"), (relative.name, ".jpg")),
            ((relative.stem, f"_{n}.jpg") for n in itertools.count(2)),
        )
        candidates = (
            relative.with_name(name_within(start, len(end)) + end) for start, end in endings
        )
        name = next(c for c in candidates if str(c).casefold() not in self.used)
        self.used.add(str(name).casefold())
        self.names[key] = name
        return name

    def save(self, source: str | Path, annotated: Image.Image) -> Path:
        """Write `annotated` (a drawing over the image at `source`) as JPEG; returns its path."""
        path = self.folder / self._copy_name(source, None)
        if path not in self.written and path.exists():
            self.replaced += 1
        self.written.add(path)
        return write_jpeg(path, _within_jpeg_size(annotated), quality=90)

    def note_replaced(self) -> None:
        """Say on stderr how many files already in the folder the copies were written over
        (a run before this one left them, perhaps of other photos of the same names), so
        that none is replaced without a word."""
        if self.replaced:
            print(
                f"note: {count_of(self.replaced, 'file')} already in {self.folder} replaced by "
                "this run's annotated copies of the same names",
                file=sys.stderr,
            )

    def save_recognition(self, found: FileRecognition) -> Path:
        """The photo of a recognition result with its boxes, labels and scores drawn (on the
        photo it holds, `recognize_files(..., keep_images=True)`, else read again)."""
        from shitu.inference.preprocess import read_rgb
        from shitu.pipeline import draw_results

        image = found.image if found.image is not None else read_rgb(found.path)
        return self.save(found.path, draw_results(image, found.results, self.fonts))


def _within_jpeg_size(image: Image.Image) -> Image.Image:
    """`image`, shrunk to JPEG's largest side where it is longer (a panorama of a shelf): the
    encoder refuses it, which stopped the run at that photo and removed every copy made."""
    longest = max(image.size)
    if longest <= JPEG_MAX_SIDE:
        return image
    scale = JPEG_MAX_SIDE / longest
    return image.resize(tuple(max(1, round(side * scale)) for side in image.size))


def refuse_inside_gallery_sources(
    folder: Path, option: str, gallery: Gallery | Catalog, kept: str
) -> None:
    """A DataError where `folder`, given as `option`, is inside a folder that the
    `gallery`'s images came from (see `collected_from`), where adding that folder to the
    gallery again (`shitu index add`) would take the files kept in it (`kept`, "the
    annotated copies") for gallery photos. Images kept in the library's own folder (those
    `shitu serve` added, in its `uploads`) came from no such folder: counted, they made
    the folder holding the library and the gallery's tree look like one tree's root."""
    from shitu.index.labels import collected_from

    here = folder.resolve()
    library = gallery.root.resolve()
    images = (
        (e.path, e.label)
        for e in gallery.entries()
        if e.path and not Path(e.path).is_relative_to(library)  # whole paths, resolved root
    )
    source = next((s for s in collected_from(images, here) if here.is_relative_to(s)), None)
    if source is not None:
        raise DataError(
            f"{option} {folder}: is inside {source}, which the gallery's images came from, "
            f"where adding that folder to the gallery again (`shitu index add`) would take "
            f"{kept} for gallery photos: choose a folder outside it"
        )


def _common_folder(images: list[Path]) -> Path | None:
    """The deepest folder that holds all `images` (absolute), None for none or where there
    is none (files on two Windows drives)."""
    try:
        return Path(os.path.commonpath([os.path.dirname(os.path.abspath(i)) for i in images]))
    except ValueError:
        return None
