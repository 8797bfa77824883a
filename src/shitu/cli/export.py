"""`shitu export`: a config's model -> an inference folder (ONNX + torch + preprocessing JSON)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shitu.cli.common import (
    add_config_arguments,
    add_progress_argument,
    config_from_args,
    cosine_similarity,
    count_of,
    expand_images,
    output_path,
    positive_int,
    progress_wanted,
    trained_weights,
)
from shitu.errors import ConfigError, weight_file_setting
from shitu.pipeline.defaults import DEFAULT_SCORE_THRES

logger = logging.getLogger(__name__)

DEFAULT_INT8_IMAGES = 128


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model for inference (ONNX + torch, preprocessing recorded)",
        description=(
            "Build the config's model without head, load Global.pretrained_model, fold "
            "re-parameterisable blocks and write DIR/model.onnx (dynamic batch), "
            "DIR/model.safetensors and DIR/shitu_model.json (preprocessing, embedding size). "
            "`shitu extract --model DIR` then needs no config file."
        ),
    )
    add_config_arguments(parser, head_option=False)
    parser.add_argument(
        "--out",
        help="output folder, replaced if an export (a symbolic link there is followed; "
        "default: the config's "
        "Global.save_inference_dir, ./inference unless set, where PaddleClas exports to)",
    )
    parser.add_argument(
        "--int8-calibration",
        nargs="+",
        action="extend",
        metavar="IMAGES_OR_FOLDER",
        help="also write model.int8.onnx, statically quantised with these images' activations",
    )
    parser.add_argument(
        "--int8-images",
        type=positive_int,
        help="how many calibration images to use, spread over the given ones (default "
        f"{DEFAULT_INT8_IMAGES})",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="float16 weights and no ONNX file, for shipping (half the size); the ONNX model "
        "is rebuilt into the user cache on first load",
    )
    parser.add_argument(
        "--score-thres",
        type=cosine_similarity,
        help="record the cosine similarity a gallery hit needs with this model (measure it "
        "with `shitu eval-pipeline --sweep`); recognition uses it unless told another "
        f"(without it: {DEFAULT_SCORE_THRES})",
    )
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shitu.inference import export_model, read_manifest
    from shitu.inference.export import check_export_target

    if args.int8_images is not None and not args.int8_calibration:
        # else the export would lack the int8 model the option suggests it makes
        raise ConfigError("--int8-images counts the --int8-calibration images; give those too")
    if args.out is not None and not args.out.strip():
        # `--out "$OUT"` with the variable unset: not the default folder, whose export it
        # would replace
        raise ConfigError(
            "--out: an empty name; give the export's folder (without --out it goes to the "
            "config's Global.save_inference_dir)"
        )
    config = config_from_args(args)
    named = "--out" if args.out else "Global.save_inference_dir"
    try:  # Path() would read `https://host/m` as the local folder `https:/host/m`
        out = output_path(args.out or config.Global.save_inference_dir)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{named}: {exc}") from None
    check_export_target(out, "--out")  # a refusal naming the flag, not export_model's out_dir
    weights = trained_weights(config, "the export holds")
    calibration: list[Path] = []
    count = args.int8_images or DEFAULT_INT8_IMAGES
    if args.int8_calibration:
        calibration = calibration_images(args.int8_calibration, count)
    with weight_file_setting("Global.pretrained_model"):
        out = export_model(
            config,
            weights,
            out,
            calibration_images=calibration,
            calibration_count=count,
            compact=args.compact,
            score_thres=args.score_thres,
            progress=progress_wanted(args),
        )
    manifest = read_manifest(out)
    files = ", ".join(manifest["files"])
    # The threshold recorded, as the warning below says where none is: nothing confirmed
    # which one recognition with the export will use.
    threshold = manifest.get("score_thres")
    recorded = "" if threshold is None else f", recognition threshold {threshold:g}"
    print(
        f"wrote {out}: {files}, {manifest['arch_name']}, {manifest['embedding_size']}-d features, "
        f"input {manifest['preprocessing']['crop'] or manifest['preprocessing']['resize']}"
        f"{recorded}"
    )
    if args.score_thres is None:
        _warn_of_default_threshold()
    return 0


def _warn_of_default_threshold() -> None:
    """Without a threshold of its own, recognition with the export falls back to
    PP-ShiTuV2's, which was chosen for another model: where it turns too many objects away,
    or lets unknown ones through, nothing would say why."""
    logger.warning(
        "no --score-thres: the export records no recognition threshold calibrated for this "
        "model, so recognition uses the default %g (PP-ShiTuV2's, for its own model); measure "
        "one with `shitu eval-pipeline --sweep` on your gallery and photos, then export again "
        "with --score-thres S (or give --score-thres to recognize)",
        DEFAULT_SCORE_THRES,
    )


def calibration_images(sources: list[str], count: int) -> list[Path]:
    """The images `sources` (files and folders) give, of which the export uses `count`,
    spread over them (`calibration_batches`), said on stderr with where they came from: the
    export alone did not show whether a folder was read, nor how much of it was used. A
    folder without images is refused (`expand_images`)."""
    found = expand_images(sources)[0]
    folders = [source for source in sources if Path(source).is_dir()]
    given = [f"in {folder}" for folder in folders[:3]]
    if len(folders) > 3:
        given.append(f"in {len(folders) - 3} more folders")
    if len(sources) > len(folders):
        given.append(f"{count_of(len(sources) - len(folders), 'file')} given")
    used = count_of(len(found), "image")
    if count < len(found):
        used = f"{count} of the {used}"
        given.append("evenly spaced: --int8-images sets how many")
    print(f"int8 calibration: {used} ({'; '.join(given)})", file=sys.stderr)
    return found
