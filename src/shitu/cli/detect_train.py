"""`shitu detect-train`: train a PicoDet detector on a COCO-JSON or VOC-XML dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shitu.cli.common import (
    add_progress_argument,
    bounded,
    input_side,
    non_negative_int,
    positive_float,
    positive_int,
    print_past_progress,
    print_summary,
    progress_wanted,
)
from shitu.errors import CheckpointError, ConfigError, DataError
from shitu.fileio import only_run_in, refuse_non_utf8_path, remove_unfinished_writes

if TYPE_CHECKING:
    from shitu.detection.data import DetectionDataset
    from shitu.detection.train import DetectionTrainer

DEFAULT_OUT = "output/detector"
# What a run writes in its --out folder, each file whole or not at all; besides, its
# metrics.jsonl, which a new run starts afresh (alone, it is the log of a run that failed
# before its first checkpoint, with nothing to resume).
RUN_FILES = ("latest.pt", "model.pt", "model.onnx")
# Where no bar is drawn (stderr a file or a pipe), a line on stderr every so many steps, as
# often as `shitu train`'s default Global.print_batch_step: an epoch of a COCO-sized set takes
# an hour or more, and its JSON line comes at its start only.
STEP_LINE_EVERY = 20
# How many class names the summary before the run shows.
_SHOWN_CLASSES = 5
# PaddleDetection's PicoDet recipes train at the input size and 32 and 64 either side (416:
# 352 to 480; the 640 mainbody detector PP-ShiTu trains: 576 to 704).
MULTI_SCALE_STEPS = (-64, -32, 0, 32, 64)
# The seeds DetectionTrainConfig takes, refused as the option, not as the config's field
SEED = bounded(int, 0, 2**63 - 1, "a whole number from 0 to 2**63 - 1")
# The options that set a run, by their DetectionTrainConfig field, whose default they take
# (the sizes: the architecture's). Left out with --resume, each is the run's own, from its
# checkpoint: a default in its place exported at another size or stretched the schedule.
RUN_OPTIONS = {
    "arch": "arch",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "input_size": "eval_size",
    "train_sizes": "train_sizes",
    "seed": "seed",
}
ARCH_SIZES = ("eval_size", "train_sizes")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect-train",
        help="train a PicoDet detector (COCO JSON or VOC XML annotations)",
        description=(
            "Train PicoDet from scratch, on the CPU (a GPU is not used), with SGD + cosine "
            "schedule, EMA and multi-scale batches; writes OUT/latest.pt each epoch (and "
            "every --checkpoint-every-steps) and when Ctrl-C or SIGTERM stops it after a step "
            "(resumable), then OUT/model.pt "
            "(EMA weights) and OUT/model.onnx (the onnxruntime path, at --input-size), "
            "either one a `shitu detect --model` or `shitu recognize --detector`, and prints "
            "COCO mAP on --val-coco or --val-voc data."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco", metavar="JSON", help="COCO instances file")
    source.add_argument(
        "--voc",
        metavar="DIR|LIST",
        help="directory of VOC XML files, or a PaddleDetection VOC list (trainval.txt: "
        "'image xml' lines, relative to --images)",
    )
    parser.add_argument("--images", required=True, help="image directory")
    val_source = parser.add_mutually_exclusive_group()
    val_source.add_argument("--val-coco", metavar="JSON", help="COCO file to evaluate on")
    val_source.add_argument(
        "--val-voc", metavar="DIR|LIST", help="VOC XML files to evaluate on, as --voc"
    )
    parser.add_argument("--val-images", help="image directory of --val-coco or --val-voc")
    parser.add_argument(
        "--arch",
        help="detector architecture (default: picodet_s_esnet, with --resume the run's; "
        "PP-ShiTu's mainbody detector: picodet_lcnet_x2_5_mainbody)",
    )
    parser.add_argument(
        "--class-agnostic", action="store_true", help="one 'foreground' class (mainbody)"
    )
    the_runs = "with --resume the run's"
    parser.add_argument(
        "--epochs", type=positive_int, help=f"training epochs (default: 300, {the_runs})"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, help=f"images per step (default: 80, {the_runs})"
    )
    parser.add_argument(
        "--lr", type=positive_float, help=f"peak learning rate (default: 0.1, {the_runs})"
    )
    parser.add_argument(
        "--input-size",
        type=input_side,
        help="input size of the evaluation and of the exports: model.onnx's fixed size, and "
        "the size model.pt runs at unless given another (default: the architecture's, 416; "
        f"640 for picodet_lcnet_x2_5_mainbody; {the_runs})",
    )
    parser.add_argument(
        "--train-sizes",
        type=input_side,
        nargs="+",
        help="input sizes of the multi-scale batches, one drawn per batch (default: the "
        "architecture's input size and 32 and 64 either side: 352 384 416 448 480; 576 to 704 "
        f"for picodet_lcnet_x2_5_mainbody; {the_runs})",
    )
    parser.add_argument("--workers", type=non_negative_int, default=0, help="data loader processes")
    parser.add_argument("--seed", type=SEED, help=f"random seed (default: 0, {the_runs})")
    parser.add_argument(
        "--out",
        help=f"output folder (default: {DEFAULT_OUT}, or with --resume the folder of the run "
        "it continues)",
    )
    # Its name before it was called --out, as on every other command; scripts use it.
    parser.add_argument("--output", dest="out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--resume",
        help="training checkpoint (latest.pt or its directory); the run's settings (--arch, "
        "--epochs, --batch-size, --lr, --input-size, --train-sizes, --seed) unless given",
    )
    parser.add_argument(
        "--checkpoint-every-steps",
        type=positive_int,
        metavar="N",
        help="also write latest.pt every N steps within an epoch (default: at its end only), "
        "so that a run killed outright loses at most N steps",
    )
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def _dataset(
    coco: str | None, voc: str | None, images: str, agnostic: bool, train: bool
) -> DetectionDataset:
    """The COCO or VOC dataset given; `train`: with the training augmentations."""
    from shitu.detection.data import CocoDetection, VocDetection, train_augment

    transform = train_augment if train else None
    if coco:
        return CocoDetection(coco, images, agnostic, transform)
    return VocDetection(voc, images, class_agnostic=agnostic, transform=transform)


def _run_settings(
    args: argparse.Namespace, saved: dict[str, Any] | None
) -> tuple[dict[str, Any], list[str]]:
    """The run's RUN_OPTIONS settings, by DetectionTrainConfig field: each option given, else
    the checkpoint's `saved` config of a resumed run, else the default; and, in words, the
    options given that change the resumed run's settings."""
    from shitu.detection.model import resolve_arch
    from shitu.detection.train import DetectionTrainConfig

    defaults = {field.name: field.default for field in dataclasses.fields(DetectionTrainConfig)}
    settings: dict[str, Any] = {}
    changes = []
    for option, field in RUN_OPTIONS.items():
        default = None if field in ARCH_SIZES else defaults[field]
        given = getattr(args, option)
        kept = None if saved is None else saved.get(field)
        settings[field] = given if given is not None else kept if kept is not None else default
        if given is not None and kept is not None and _shown(given) != _shown(kept):
            option_name = f"--{option.replace('_', '-')}"
            changes.append(f"{option_name} {_shown(given)} (the run's: {_shown(kept)})")
    # The architecture's own sizes: the mainbody detector was trained and exported at
    # PicoDet-S's 416, not at PP-ShiTu's 640, without a word.
    arch_size = resolve_arch(settings["arch"]).input_size
    settings["eval_size"] = settings["eval_size"] or arch_size
    sizes = settings["train_sizes"] or [arch_size + step for step in MULTI_SCALE_STEPS]
    settings["train_sizes"] = tuple(sizes)
    return settings, changes


def _shown(value: Any) -> str:
    """A setting as its option is written: sizes (a list or, from a checkpoint, a tuple) as
    space-separated numbers."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _summary(
    trainer: DetectionTrainer,
    val: DetectionDataset | None,
    resumed: str | None,
    changes: list[str],
) -> dict[str, Any]:
    """What the run is about to do (`print_summary`): hours of training follow."""
    dataset, config = trainer.dataset, trainer.config
    names = ", ".join(dataset.class_names[:_SHOWN_CLASSES])
    more = ", ..." if len(dataset.class_names) > _SHOWN_CLASSES else ""
    return {
        "architecture": config.arch,
        "train images": f"{len(dataset)} ({sum(map(len, dataset.boxes))} boxes)",
        "classes": f"{len(dataset.class_names)} ({names}{more})",
        "validation images": "none" if val is None else str(len(val)),
        "batch size": config.batch_size,
        "steps per epoch": len(trainer.sampler),
        "epochs": config.epochs,
        "learning rate": config.learning_rate,
        "input sizes": f"{' '.join(map(str, config.train_sizes))} (evaluation, exports: "
        f"{config.eval_size})",
        "seed": config.seed,
        "start": f"resumed from {resumed} at step {trainer.progress.global_step}"
        + "".join(f", {change}" for change in changes)
        if resumed
        else "from scratch",
        "output": config.output_dir,
    }


def run(args: argparse.Namespace) -> int:
    from shitu.engine.state import load_training_state, resolve_checkpoint

    if bool(args.val_coco or args.val_voc) != bool(args.val_images):
        raise ConfigError("--val-images and --val-coco (or --val-voc) go together")
    resumed, saved = None, None
    if args.resume:
        checkpoint = resolve_checkpoint(args.resume, "--resume")
        # Any other file is refused before the run locks that folder (an .onnx given from a
        # models folder left it a .shitu-train.lock) and reads its training data; its run's
        # settings are those of the options left out.
        saved = load_training_state(checkpoint, "--resume", kind="detector")[0].get("config", {})
        # The folder of the run resumed, which it goes on writing to unless told otherwise.
        resumed = checkpoint.parent
    output = Path(args.out) if args.out else resumed or Path(DEFAULT_OUT)
    # The run ends by writing model.onnx there (`export_onnx`, which refuses such a path):
    # refused now, not after the training.
    readers = "torch's ONNX exporter and onnxruntime"
    refuse_non_utf8_path(output.absolute(), "--out's path", readers, ConfigError)
    continues = resumed is not None and resumed.resolve() == output.resolve()
    earlier = [name for name in RUN_FILES if (output / name).exists()]
    if earlier and not continues:
        # a new run, or one resumed from elsewhere, would write over them
        raise _earlier_run_refusal(output, earlier)
    # Made now, not after the first epoch; one another run trains in is refused, and one
    # made for a run that fails to start (bad data, a checkpoint of another detector) goes.
    with only_run_in(output, "--out", "shitu detect-train"):
        # A save killed outright (SIGKILL once a SIGTERM's grace period ran out) left its
        # temporary file, a whole checkpoint's size, beside the file it kept.
        remove_unfinished_writes(output, RUN_FILES)
        return _train(args, saved, output, continues)


def _earlier_run_refusal(output: Path, earlier: list[str]) -> ConfigError:
    """The refusal of an --out that holds the files `earlier` of a run: the --resume it
    offers only where its latest.pt is a detect-train run's (`shitu train`'s, or none at
    all, was offered too, and --resume then refused it)."""
    from shitu.engine.state import load_training_state

    latest = output / "latest.pt"
    held = f"--out {output}: holds an earlier run ({', '.join(earlier)})"
    if not latest.is_file():
        return ConfigError(
            f"{held}, with no latest.pt to resume; give another --out (or remove that one)"
        )
    try:
        load_training_state(latest, "its", kind="detector")
    except CheckpointError as exc:
        return ConfigError(
            f"{held}, but no detect-train run to resume ({exc}); give another --out (or "
            "remove that one)"
        )
    return ConfigError(
        f"{held}; resume it with --resume {shlex.quote(str(latest))}, or give another --out "
        "(or remove that one)"
    )


def _train(
    args: argparse.Namespace, saved: dict[str, Any] | None, output: Path, continues: bool
) -> int:
    """The run, into `output`; `saved`: the config in the checkpoint resumed, if one is;
    `continues`: the run resumed is the one of that folder."""
    from tqdm import tqdm

    from shitu.detection.export import export_onnx
    from shitu.detection.train import DetectionTrainConfig, DetectionTrainer, evaluate_detector
    from shitu.engine.metrics_log import MetricsLog

    settings, changes = _run_settings(args, saved)
    input_size = settings["eval_size"]
    dataset = _dataset(args.coco, args.voc, args.images, args.class_agnostic, train=True)
    val = None
    if args.val_images:  # read (and matched to the training classes) before any training
        agnostic = args.class_agnostic
        val = _dataset(args.val_coco, args.val_voc, args.val_images, agnostic, train=False)
        given = f"--val-coco {args.val_coco}" if args.val_coco else f"--val-voc {args.val_voc}"
        if all(hard.all() for hard in val.difficult):  # its mAP would be a meaningless 0
            raise ConfigError(
                f"{given}: its {len(val)} images hold no boxes to evaluate against (none "
                "annotated, none inside their image, or all difficult, which evaluation ignores)"
            )
        try:
            val.use_class_order(dataset.class_names)
        except DataError as exc:
            raise ConfigError(f"{given}: {exc}") from None
    config = DetectionTrainConfig(
        **settings,
        num_workers=args.workers,
        output_dir=str(output),
        checkpoint_every_steps=args.checkpoint_every_steps,
    )
    trainer = DetectionTrainer(dataset, config)
    if args.resume:
        trainer.resume(args.resume)
    print_summary(_summary(trainer, val, args.resume, changes))
    # The losses and the mAP kept beside the model, as stdout may be gone; a run that goes on
    # in its folder drops the records it wrote there after its checkpoint.
    resume_step = trainer.progress.global_step if continues else None
    metrics_log = MetricsLog(output, resume_step=resume_step)
    steps_per_epoch = len(trainer.sampler)
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=trainer.progress.global_step,
        desc="training",
        unit="step",
        disable=not progress_wanted(args),
        dynamic_ncols=True,
    )

    prints_lines = not args.no_progress and bar.disable
    images_per_step = min(config.batch_size, len(dataset))
    window_start, window_steps = time.monotonic(), 0

    def log(record: dict[str, float]) -> None:
        nonlocal window_start, window_steps
        # Steps done, as metrics.jsonl and the stderr lines count them (the trainer's record
        # has the step's 0-based index).
        step = int(record["step"]) + 1
        losses = {key: value for key, value in record.items() if key != "step"}
        first_of_epoch = record["step"] % steps_per_epoch == 0
        if first_of_epoch:
            rounded = {key: round(value, 5) for key, value in losses.items()}
            print_past_progress(json.dumps({"step": step, **rounded}))
        bar.update(1)
        epoch = record["step"] // steps_per_epoch + 1
        bar.set_postfix(epoch=f"{epoch}/{config.epochs}", loss=f"{record['loss']:.4f}")
        window_steps += 1
        if step % STEP_LINE_EVERY == 0 or first_of_epoch:
            metrics_log.write("train", step, epoch=epoch, **losses)
        if prints_lines and step % STEP_LINE_EVERY == 0:
            elapsed = max(time.monotonic() - window_start, 1e-9)
            print(
                f"epoch {epoch}/{config.epochs} step {step}/{bar.total}: loss "
                f"{record['loss']:.4f}, lr {record['lr']:.2e}, "
                f"{window_steps * images_per_step / elapsed:.1f} images/s",
                file=sys.stderr,
                flush=True,
            )
            window_start, window_steps = time.monotonic(), 0

    with bar:
        trainer.train(on_step=log)
    # Stopped by a signal (one during the last step came too late to stop it): not done, as
    # a caller (`detect-train && ...`) must see.
    if trainer.stop_signal is not None and trainer.progress.epoch < config.epochs:
        progress, latest = trainer.progress, shlex.quote(str(trainer.checkpoint_path))
        print(
            f"stopped early after step {progress.global_step} ({progress.epoch} of "
            f"{config.epochs} epochs done); resume with --resume {latest}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + trainer.stop_signal
    path = trainer.export(output / "model.pt")
    # The fast CPU path (onnxruntime), at --input-size, with the class names in the file
    onnx = export_onnx(trainer.ema.model, output / "model.onnx", input_size)
    print(json.dumps({"model": str(path), "onnx": str(onnx)}))
    if val is not None:
        model, size = trainer.ema.model, input_size
        try:
            metrics = evaluate_detector(model, val, size, progress=progress_wanted(args))
        except DataError as exc:  # an image that cannot be read, after the whole run
            latest = shlex.quote(str(trainer.checkpoint_path))
            raise DataError(
                f"{exc}; the trained model is saved: once the image is put right, the same "
                f"command with --resume {latest} evaluates it (without training again)"
            ) from None
        metrics_log.write("eval", trainer.progress.global_step, **metrics)
        print(json.dumps(metrics))
    return 0
