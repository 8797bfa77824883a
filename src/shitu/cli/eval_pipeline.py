"""`shitu eval-pipeline`: end-to-end accuracy on labelled query photos (recall@1, and
open-set rejection for queries whose label is not in the gallery), optionally over a
sweep of score thresholds to choose one."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shitu.cli.common import (
    add_leaf_labels_argument,
    add_progress_argument,
    count_of,
    progress_wanted,
    required_path,
    table_field,
)
from shitu.cli.recognize import (
    add_pipeline_arguments,
    naming_config_paths,
    pipeline_config_from_args,
)
from shitu.errors import DataError
from shitu.index import GalleryItem, collect_items
from shitu.index.gallery import LIBRARY_FILE
from shitu.pipeline.defaults import MIN_SWEEP_STEP

if TYPE_CHECKING:
    from shitu.pipeline.evaluate import PipelineEvaluation

SHOWN_MISTAKES = 10
DEFAULT_SWEEP_STEP = 0.05
SWEEP_COLUMNS = ("score_thres", "recall@1", "rejection", "open_set_accuracy", "balanced_accuracy")


def _step(text: str) -> float:
    try:
        step = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sweep step {text!r}: not a number") from None
    if not MIN_SWEEP_STEP <= step <= 1:
        raise argparse.ArgumentTypeError(f"sweep step {text}: must be from {MIN_SWEEP_STEP} to 1")
    return step


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-pipeline",
        help="end-to-end recall@1 of `shitu recognize` on labelled query photos",
        description=(
            "Recognise every query photo with the full pipeline (detector, threshold, NMS) "
            "and count how often its best result has the query's label (recall@1; no result "
            "counts as wrong). Queries whose label is not in the gallery are unknown: right "
            "when nothing is recognised (rejection). Queries: a `path<TAB>label` file or a "
            "folder-per-label tree."
        ),
    )
    parser.add_argument("--queries", type=required_path, required=True, help="label file or folder")
    add_leaf_labels_argument(parser)
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--sweep",
        nargs="?",
        const=DEFAULT_SWEEP_STEP,
        type=_step,
        metavar="STEP",
        help="also report every score threshold from 0 to 1 in steps of STEP (default "
        f"{DEFAULT_SWEEP_STEP}, at least {MIN_SWEEP_STEP}) and, with unknown queries, the "
        "one with the best balanced accuracy: a threshold to record with `shitu export "
        "--score-thres`",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_progress_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shitu.pipeline import Recognizer, evaluate_pipeline
    from shitu.pipeline.evaluate import known_labels, sweep_thresholds

    if (Path(args.queries) / LIBRARY_FILE).is_file():  # was refused as gallery images
        raise DataError(
            f"--queries {args.queries}: a gallery library, not query photos; give labelled "
            "query photos (a folder of label folders, or a `path<TAB>label` file), and the "
            "library as --gallery"
        )
    # no --label here; queries named as given in what it reports
    items = collect_items(
        [args.queries], one_label_option=False, leaf_labels=args.leaf_labels, resolve=False
    )
    config = pipeline_config_from_args(args)
    thresholds = sweep_thresholds(args.sweep) if args.sweep else []
    with naming_config_paths(args, config):
        recognizer = Recognizer.from_config(config)
    with recognizer:
        report = evaluate_pipeline(recognizer, items, progress_wanted(args), thresholds)
        known = known_labels(recognizer)
    best = report.best_threshold()
    for path, reason in report.unreadable:  # as every command names what it skips: on stderr
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    if report.in_gallery:
        one = report.in_gallery == 1
        print(
            f"warning: {report.in_gallery} of {count_of(len(items), 'query image')} "
            f"{'is a gallery image itself' if one else 'are gallery images themselves'} (the "
            f"same file or its copy): {'it finds itself' if one else 'each finds itself'} "
            "first, so recall@1 overstates; query with photos that are not in the gallery",
            file=sys.stderr,
        )
    if not report.queries:  # exit 1 like recognize and extract: nothing was measured
        unread = (
            "the query could not be read"
            if len(items) == 1
            else f"none of the {len(items)} queries could be read"
        )
        print(f"error: {unread}", file=sys.stderr)
        return 1
    if not report.known_queries:
        print(no_label_in_gallery(report, items, known), file=sys.stderr)
    if args.json:
        output: dict = report.to_dict()
        if thresholds:
            output["sweep"] = [point.to_dict() for point in report.sweep]
            output["best_score_thres"] = best.score_thres if best else None
        print(json.dumps(output))
        return 0
    for path, truth, predicted in report.mistakes[:SHOWN_MISTAKES]:
        # An unknown query's right answer is nothing, not its label.
        expected = repr(truth) if truth in known else f"nothing ({truth!r} is not in the gallery)"
        got = repr(predicted) if predicted else "nothing"  # not a label called 'nothing'
        # a line each: a file named with a line break (a folder tree's) is quoted
        print(f"wrong: {table_field(str(path))}: expected {expected}, got {got}")
    if len(report.mistakes) > SHOWN_MISTAKES:
        hidden = len(report.mistakes) - SHOWN_MISTAKES
        print(f"wrong: ... and {hidden} more (the first {SHOWN_MISTAKES} listed)")
    for key, value in report.to_dict().items():
        # A rate of no queries (recall@1 when no query's label is in the gallery) is undefined.
        print(f"{key:>17}: {'- (no query it applies to)' if value is None else value}")
    if thresholds:
        print(sweep_table(report))
        if best is not None:
            print(
                f"best balanced accuracy at score_thres {best.score_thres}: recall@1 "
                f"{best.recall_at_1:.4f}, rejection {best.rejection:.4f}"
            )
        elif not report.known_queries:
            print("no query has a label in the gallery: add some to choose a threshold")
        elif report.unknown_queries:
            print(
                "no threshold tells unknown from known queries apart better than rejecting "
                "everything (balanced accuracy 0.5): their scores overlap"
            )
        else:
            print("no query has a label outside the gallery: add some to choose a threshold")
    return 0


def no_label_in_gallery(
    report: PipelineEvaluation, items: Sequence[GalleryItem], known: set[str]
) -> str:
    """The warning for queries none of whose labels the gallery has: usually labels
    written another way (case, ids for names), which the report alone would show only as
    every query counted unknown."""

    def examples(labels: Iterable[str]) -> str:
        names = sorted(labels)
        shown = ", ".join(repr(label) for label in names[:3])
        return f"{shown}, ..." if len(names) > 3 else shown

    gallery = examples(known) if known else "none, it holds no images"
    return (
        f"warning: no query's label is in the gallery, so all {report.queries} count as "
        f"unknown, right only when nothing is recognised (the queries' labels: "
        f"{examples({item.label for item in items})}; the gallery's: {gallery}); if they "
        "are the gallery's products, label them as the gallery does"
    )


def sweep_table(report: PipelineEvaluation) -> str:
    """One row per swept threshold: recall@1, rejection, open-set and balanced accuracy."""
    lines = ["  ".join(f"{column:>17}" for column in SWEEP_COLUMNS)]
    for point in report.sweep:
        values = point.to_dict(digits=None)  # rounded once, by the format below
        cells = [f"{point.score_thres:>17g}"] + [
            f"{'-' if values.get(c) is None else format(values[c], '.4f'):>17}"
            for c in SWEEP_COLUMNS[1:]
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
