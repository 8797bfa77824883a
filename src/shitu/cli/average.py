"""`shitu average`: one checkpoint from the mean of several runs' weights (a model soup),
optionally moved part of the way back to the pretrained initialisation (WiSE-FT)."""

from __future__ import annotations

import argparse

from shitu.cli.common import (
    add_config_arguments,
    arch_of_model,
    config_from_args,
    model_from_config,
    output_path,
    required_path,
    weights_folder,
    writable_weights_file,
)
from shitu.errors import CheckpointError, ConfigError
from shitu.fileio import removed_if_left_empty


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "average",
        help="average the weights of several training runs of one model (a model soup)",
        description=(
            "Write the element-wise mean of several checkpoints of the same architecture, "
            "e.g. best_model.safetensors of runs fine-tuned from the same ImageNet weights "
            "with different schedules or losses. With --pretrained-share S, the tensors under "
            "--layers are then moved a share S of the way back to the model as the config "
            "initialises it (its pretrained weights); one checkpoint is enough for that. "
            "Evaluate the result with `shitu eval`."
        ),
    )
    parser.add_argument(
        "weights", type=required_path, nargs="+", help=".safetensors, .pt or .pth checkpoints"
    )
    parser.add_argument(
        "--out", type=output_path, required=True, help="output file: .safetensors, .pt or .pth"
    )
    parser.add_argument(
        "--weighting",
        nargs="+",
        action="extend",
        type=float,
        metavar="W",
        help="relative weight of each file, in their order (default: equal), e.g. 3 1 to add "
        "a fourth run to a three-run soup",
    )
    parser.add_argument(
        "--pretrained-share",
        type=float,
        metavar="S",
        help="mix in the config's initial weights at this share (0 < S < 1), e.g. 0.2",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        action="extend",
        metavar="PREFIX",
        help="module paths to mix (with --pretrained-share), e.g. backbone.blocks backbone.head",
    )
    add_config_arguments(parser, head_option=False, default=None)  # with --pretrained-share
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with removed_if_left_empty(weights_folder(args.out)):  # made, then nothing written: removed
        return _average(args)


def _average(args: argparse.Namespace) -> int:
    from shitu.checkpoint import average_weights, interpolate_toward, read_weights, save_weights
    from shitu.checkpoint.average import check_share
    from shitu.checkpoint.io import REPARAMETERIZED, check_finite, fit_hint
    from shitu.models.reparam import is_reparameterized

    writable_weights_file(args.out)  # now, not after reading and averaging every file
    if (args.pretrained_share is None) != (args.layers is None):
        raise CheckpointError("--pretrained-share and --layers go together")
    if args.weighting and len(args.weights) < 2:
        raise CheckpointError("--weighting weighs two or more weight files against each other")
    config = None  # the model mixed in, checked before any weight file is read
    if args.pretrained_share is None and len(args.weights) < 2:
        raise CheckpointError(
            "averaging needs at least two weight files, got 1 (one file is mixed with the "
            "config's pretrained weights with --pretrained-share S --layers PREFIX -c CONFIG)"
        )
    if args.pretrained_share is None:
        if args.override or args.config is not None:  # else ignored: the files say the model
            raise CheckpointError(
                "-c and -o are read only with --pretrained-share (they name the model mixed in)"
            )
    else:
        check_share(args.pretrained_share)
        if args.config is None:
            raise ConfigError(
                "--pretrained-share needs -c CONFIG: the config whose pretrained backbone is "
                "mixed in"
            )
        config = config_from_args(args)
        if not config.Arch.backbone_pretrained():
            raise ConfigError(
                f"--pretrained-share mixes towards the backbone's pretrained weights, but "
                f"{args.config} sets no Arch.Backbone.pretrained (it would mix in a random "
                "initialisation)"
            )
    if len(args.weights) > 1 or config is None:
        state, metadata = average_weights(args.weights, args.weighting)
        done = f"the mean of {len(args.weights)} checkpoints"
        if args.weighting:
            done += f" weighted {' : '.join(f'{w:g}' for w in args.weighting)}"
    else:
        state, metadata = read_weights(args.weights[0])
        done = str(args.weights[0])
    if config is not None:
        if metadata.get(REPARAMETERIZED) == "true":  # its tensors are not the config's
            raise CheckpointError(
                f"{args.weights[0]} holds folded (re-parameterised) weights: mix the "
                "checkpoint they were folded from"
            )
        initialised = model_from_config(config, args)
        if is_reparameterized(initialised):  # loading the pretrained file folded the backbone
            raise CheckpointError(
                f"{args.config}: Arch.Backbone.pretrained holds folded (re-parameterised) "
                "weights, an export's, which unfolded weights cannot be mixed with: give the "
                "weights they were folded from"
            )
        reference = initialised.state_dict()
        pretrained = {f"backbone.{name}" for name in initialised.backbone.pretrained_tensors}
        # A shape that differs names the settings that do, where the weights record theirs.
        hint = fit_hint(metadata, arch_of_model(config))
        state = interpolate_toward(
            state,
            reference,
            args.pretrained_share,
            args.layers,
            hint,
            pretrained,
            reference_name="the model the config builds",
        )
        done += f", {', '.join(args.layers)} mixed with {args.config} at {args.pretrained_share}"
    check_finite(state, done)
    out = save_weights(state, args.out, metadata)
    print(f"wrote {out}: {done}, {len(state)} tensors")
    return 0
