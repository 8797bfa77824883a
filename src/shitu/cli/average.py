"""`shitu average`: one checkpoint from the mean of several runs' weights (a model soup)."""

from __future__ import annotations

import argparse

from shitu.checkpoint import average_weights, save_weights


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "average",
        help="average the weights of several training runs of one model (a model soup)",
        description=(
            "Write the element-wise mean of several checkpoints of the same architecture, "
            "e.g. best_model.safetensors of runs fine-tuned from the same ImageNet weights "
            "with different schedules or losses. Evaluate the result with `shitu eval`."
        ),
    )
    parser.add_argument("weights", nargs="+", help="two or more .safetensors/.pt checkpoints")
    parser.add_argument("--out", required=True, help="output file: .safetensors or .pt")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state, metadata = average_weights(args.weights)
    out = save_weights(state, args.out, metadata)
    print(f"wrote {out}: the mean of {len(args.weights)} checkpoints, {len(state)} tensors")
    return 0
