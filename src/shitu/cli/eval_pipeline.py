"""`shitu eval-pipeline`: end-to-end accuracy on labelled query photos (recall@1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shitu.cli.recognize import add_pipeline_arguments, pipeline_config_from_args
from shitu.index import collect_items

SHOWN_MISTAKES = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-pipeline",
        help="end-to-end recall@1 of `shitu recognize` on labelled query photos",
        description=(
            "Recognise every query photo with the full pipeline (detector, threshold, NMS) "
            "and count how often its best result has the query's label. Queries with no "
            "result count as wrong. Queries: a `path<TAB>label` file or a folder-per-label tree."
        ),
    )
    parser.add_argument("--queries", type=Path, required=True, help="label file or folder")
    add_pipeline_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shitu.pipeline import Recognizer, evaluate_pipeline

    items = collect_items([args.queries])
    config = pipeline_config_from_args(args)
    with Recognizer.from_config(config) as recognizer:
        report = evaluate_pipeline(recognizer, items, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    for path, truth, predicted in report.mistakes[:SHOWN_MISTAKES]:
        print(f"wrong: {path}: expected {truth!r}, got {predicted or 'nothing'!r}")
    for path, reason in report.unreadable[:SHOWN_MISTAKES]:
        print(f"skipped: {path}: {reason}")
    for key, value in report.to_dict().items():
        print(f"{key:>10}: {value}")
    return 0
