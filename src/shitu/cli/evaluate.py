"""`shitu eval`: retrieval metrics of a trained model on the config's query/gallery sets."""

from __future__ import annotations

import argparse
import json

from shitu.cli.common import (
    add_config_arguments,
    add_progress_argument,
    arch_of_model,
    config_from_args,
    model_from_config,
    trained_weights,
)
from shitu.errors import weight_file_setting


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate retrieval (recall@k, mAP, ...) on DataLoader.Eval query/gallery sets",
        description=(
            "Embed DataLoader.Eval.Query and .Gallery (without a Gallery the query set is its "
            "own gallery, each image's own entry excluded) and print Metric.Eval metrics."
        ),
    )
    add_config_arguments(parser, head_option=False)
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from shitu.checkpoint import load_weights
    from shitu.engine.distributed import init_distributed, shutdown_distributed
    from shitu.engine.evaluate import RetrievalEvaluation, check_evaluation_data
    from shitu.engine.seeding import seed_everything

    config = config_from_args(args, needs=check_evaluation_data)
    weights = trained_weights(config, "this evaluates")
    config.Arch.Head = None  # retrieval needs no classifier
    context = init_distributed(config.Global.device)
    try:
        # New layers (an untrained embedding) start as training starts them: the same
        # numbers on every run.
        seed_everything(config.Global.seed if config.Global.seed is not None else 0)
        model = model_from_config(config, args, pretrained=not weights)
        if weights:
            with weight_file_setting("Global.pretrained_model"):
                load_weights(model, weights, ignore_prefixes=("head.",), arch=arch_of_model(config))
        model.to(context.device)
        if config.Global.channels_last:  # the layout training evaluates in: the same rounding
            model.to(memory_format=torch.channels_last)
        evaluation = RetrievalEvaluation(config, context, seed=0, progress=not args.no_progress)
        result = evaluation.run(model)
    finally:
        shutdown_distributed()
    if not context.is_main:
        return 0
    if args.json:
        counts = {
            "num_queries": result.num_queries,
            "num_queries_without_positive": result.num_queries_without_positive,
        }
        print(json.dumps({**result.metrics, **counts}))
        return 0
    width = max(len(k) for k in result.metrics)
    print(f"{'metric':<{width}}  value")
    for key, value in result.metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"queries: {result.num_queries}", end="")
    skipped = result.num_queries_without_positive
    print(f" ({skipped} without a match in the gallery, not counted)" if skipped else "")
    return 0
