"""`shitu info`: build the shipped model, or the model a config describes, and report its size,
outputs and speed."""

from __future__ import annotations

import argparse
import time

from shitu.cli.common import (
    add_config_arguments,
    arch_of_model,
    config_from_args,
    count_of,
    count_parameters,
    model_from_config,
    positive_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameters, outputs and CPU speed of the shipped model, or of a config's",
        description="Build the model a config describes (no data needed) and print a summary; "
        "without -c, of the shipped model the recognition commands run without --model.",
    )
    add_config_arguments(
        parser,
        default=None,
        without="the shipped model: its weights, without a head, in the config it was "
        "trained with, which --weights fills with others instead",
    )
    parser.add_argument(
        "--weights",
        help="load these weights first (.safetensors/.pt/.pth/.pdparams; default: the config's "
        "Global.pretrained_model, if it names one)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="batch for the timing run"
    )
    parser.add_argument(
        "--reparameterize", action="store_true", help="fold re-parameterisable blocks first"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from shitu.checkpoint import load_weights
    from shitu.errors import weight_file_setting
    from shitu.inference.default_model import DEFAULT_MODEL_CONFIG, default_model_dir
    from shitu.inference.manifest import TORCH_FILE

    shipped = args.config is None
    args.config = DEFAULT_MODEL_CONFIG if shipped else args.config  # `-c ""` is refused
    config = config_from_args(args)
    # As eval and export, the config's trained weights where it names them (they were left
    # unread, the model reported as initialised).
    weights = args.weights or config.Global.pretrained_model
    if shipped and not weights:  # what a new user runs, not an untrained model of a config
        weights = str(default_model_dir() / TORCH_FILE)
        config.Arch.Head = None  # an export's weights hold no classifier
    model = model_from_config(config, args, pretrained=not weights).eval()
    if weights:
        setting = "--weights" if args.weights else "Global.pretrained_model"
        if shipped:  # the user named no config: say which model the file has to fit
            setting += f" (without -c, into {DEFAULT_MODEL_CONFIG}'s model)"
        with weight_file_setting(setting):
            load_weights(
                model,
                weights,
                ignore_prefixes=("head.",) if args.no_head else (),
                arch=arch_of_model(config),
            )
    if args.reparameterize:
        model.reparameterize()
    channels, height, width = config.Global.image_shape
    batch = torch.randn(args.batch_size, channels, height, width)
    with torch.inference_mode():  # stages that do not fit were refused when it was built
        outputs = model(batch)
        start = time.perf_counter()
        model(batch)
        elapsed = time.perf_counter() - start

    arch = config.Arch
    print(f"config       {args.config}")
    if weights:
        print(f"weights      {weights}")
    print(f"backbone     {arch.Backbone.name:<28} {count_parameters(model.backbone):>12,} params")
    if arch.Neck:
        print(f"neck         {arch.Neck.name:<28} {count_parameters(model.neck):>12,} params")
    if arch.Head:
        print(f"head         {arch.Head.name:<28} {count_parameters(model.head):>12,} params")
    print(f"total        {'':<28} {count_parameters(model):>12,} params")
    print(f"input        {args.batch_size} x {channels} x {height} x {width}")
    for key, value in outputs.items():
        print(f"out {key:<9}{' x '.join(str(d) for d in value.shape)}")
    print(
        f"speed        {args.batch_size / elapsed:.1f} images/s on CPU in torch eager mode "
        f"({count_of(torch.get_num_threads(), 'thread')}, one timed batch; recognize "
        "runs the export in onnxruntime, faster)"
    )
    return 0
