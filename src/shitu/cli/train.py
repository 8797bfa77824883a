"""`shitu train`: train a recognition model from a config (single process or torchrun)."""

from __future__ import annotations

import argparse
import sys

from shitu.cli.common import add_config_arguments, config_from_args, positive_int, positive_minutes
from shitu.config.schema import ShituConfig
from shitu.engine.distributed import DistContext, shutdown_distributed
from shitu.engine.linear_probe import fine_tune_stage, probe_stage
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
            "section both hold the weight average. With a LinearProbe section a probe on "
            "frozen features runs first, into OUTPUT/linear_probe (the step and time limits "
            "count the fine-tuning only; a resumed run skips the probe). Multi-GPU: "
            "torchrun --nproc_per_node=N -m shitu train -c CONFIG."
        ),
    )
    add_config_arguments(parser, head_option=False)
    parser.add_argument(
        "--stop-after-steps",
        type=positive_int,
        metavar="N",
        help="stop (with a checkpoint) once the run reaches global step N",
    )
    parser.add_argument(
        "--time-limit",
        type=positive_minutes,
        metavar="MINUTES",
        help="stop (with a checkpoint) after this many minutes; resume later to go on",
    )
    parser.set_defaults(func=run)


def _print_summary(trainer: Trainer) -> None:
    if trainer.context.is_main:
        summary = training_summary(trainer)
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}", file=sys.stderr)


def _probe(config: ShituConfig) -> tuple[bool, DistContext]:
    """Run the LinearProbe stage to its end; False when a signal stopped it."""
    trainer = Trainer(probe_stage(config))
    if trainer.context.is_main:
        print(
            f"linear probe: {config.LinearProbe.epochs} epochs with "
            f"{', '.join(config.LinearProbe.frozen_layers)} frozen, then the configured run",
            file=sys.stderr,
        )
    _print_summary(trainer)
    result = trainer.fit()
    if trainer.context.is_main and not result.finished:
        print("stopped during the linear probe; run the same command again to start over")
    return result.finished, trainer.context


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    context = None
    try:
        if config.LinearProbe is not None:
            # A resumed run's checkpoint already holds weights that went through the probe.
            if config.Global.checkpoints is None:
                finished, context = _probe(config)
                if not finished:
                    return 1
            config = fine_tune_stage(config)
        trainer = Trainer(config, context)
        _print_summary(trainer)
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
