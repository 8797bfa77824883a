"""`shitu train`: train a recognition model from a config (single process or torchrun)."""

from __future__ import annotations

import argparse
import sys

from shitu.cli.common import add_config_arguments, config_from_args
from shitu.engine.distributed import shutdown_distributed
from shitu.engine.trainer import Trainer, training_summary


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a recognition model (resume with -o Global.checkpoints=OUTPUT/latest.pt)",
        description=(
            "Train the model a config describes. Checkpoints go to Global.output_dir: "
            "latest.pt (full state, for -o Global.checkpoints=...), best_model.safetensors "
            "(the best evaluated epoch's weights, for -o Global.pretrained_model=...) and, "
            "once the run finishes, final_model.safetensors (the last epoch's); with an EMA "
            "section both hold the weight average. Multi-GPU: "
            "torchrun --nproc_per_node=N -m shitu train -c CONFIG."
        ),
    )
    add_config_arguments(parser, head_option=False)
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="N",
        help="stop (with a checkpoint) once the run reaches global step N",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="stop (with a checkpoint) after this many minutes; resume later to go on",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        trainer = Trainer(config)
        if trainer.context.is_main:
            width = max(len(k) for k in training_summary(trainer))
            for key, value in training_summary(trainer).items():
                print(f"{key:<{width}}  {value}", file=sys.stderr)
        time_limit = args.time_limit * 60 if args.time_limit is not None else None
        result = trainer.fit(stop_after_steps=args.stop_after_steps, time_limit_s=time_limit)
    finally:
        shutdown_distributed()
    if trainer.context.is_main:
        progress = result.progress
        if result.finished:
            print(
                f"finished at epoch {progress.epoch}, step {progress.global_step}: "
                f"{result.output_dir}/final_model.safetensors"
            )
        else:
            print(
                f"stopped early after step {progress.global_step} ({progress.epoch} of "
                f"{config.Global.epochs} epochs done); resume with "
                f"-o Global.checkpoints={result.output_dir}/latest.pt"
            )
        if progress.best_metric is not None:
            print(
                f"best {config.Global.eval_metric} {progress.best_metric:.4f} at epoch "
                f"{progress.best_epoch}: {result.output_dir}/best_model.safetensors"
            )
    return 0
