"""`shitu convert`: turn PaddleClas .pdparams (or any supported weights) into our checkpoint."""

from __future__ import annotations

import argparse

from shitu.cli.common import (
    add_config_arguments,
    arch_of_model,
    config_from_args,
    count_of,
    count_parameters,
    model_from_config,
    output_path,
    required_path,
    weights_folder,
    writable_weights_file,
)
from shitu.fileio import removed_if_left_empty


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert PaddleClas .pdparams weights into a safetensors/torch checkpoint",
        description=(
            "Load weights (PaddleClas .pdparams need no Paddle install) into the model a config "
            "describes, check every tensor fits, and write a .safetensors (or .pt) checkpoint."
        ),
    )
    parser.add_argument(
        "weights", type=required_path, help="source weights: .pdparams, .safetensors, .pt or .pth"
    )
    parser.add_argument(
        "--out", type=output_path, required=True, help="output file: .safetensors, .pt or .pth"
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--reparameterize",
        action="store_true",
        help="fold re-parameterisable blocks before saving (inference-only checkpoint)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with removed_if_left_empty(weights_folder(args.out)):  # made, then nothing written: removed
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from shitu.checkpoint import load_weights, model_metadata, save_weights
    from shitu.checkpoint.io import check_finite

    writable_weights_file(args.out)  # now, not after loading and converting the weights
    config = config_from_args(args)
    # every tensor comes from the weights file: no ImageNet weights to install or load first
    model = model_from_config(config, args, pretrained=False).eval()
    report = load_weights(
        model,
        args.weights,
        ignore_prefixes=("head.",) if args.no_head else (),
        arch=arch_of_model(config),
    )
    if args.reparameterize:
        model.reparameterize()
    state = model.state_dict()
    check_finite(state, str(args.weights))
    out = save_weights(state, args.out, model_metadata(model, config.Arch.model_dump(mode="json")))
    # The count the file holds: folding merges the tensors loaded into fewer.
    folding = args.reparameterize and len(state) != len(report.loaded)
    folded = f" (folded from {len(report.loaded)})" if folding else ""
    dropped = f", {count_of(len(report.dropped), 'file tensor')} left out" if report.dropped else ""
    print(
        f"wrote {out}: {len(state)} tensors{folded}, {count_parameters(model):,} parameters, "
        f"{config.Arch.Backbone.name}{dropped}"
    )
    return 0
