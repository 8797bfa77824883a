"""Unknown objects and the score threshold, on the Grocery Store dataset.

Usage: python benchmarks/open_set.py [--model DIR ...] [--step 0.05]
       [--thresholds 0.5 0.6 0.7 0.8] [--work DIR]

Each model is an export (`shitu export`; default: the shipped model). Recognition is
`shitu eval-pipeline`'s: whole image, the best gallery hit's label if its cosine score
reaches the threshold, else nothing. A query whose class has no gallery image is unknown
and right only when nothing is recognised. Classes are split by fine class id:

- trained: id % 4 != 3 (61 classes): what the model card's 61-class run trains on
- new, in the gallery: id % 8 == 3 (10 classes); new, not in the gallery: id % 8 == 7

Protocol "new domain": every class is one the 61-class run never trained on, as with a
user's own products or another domain. Gallery: the first half (by file name) of each
new-in-gallery class's train photos; queries: the second half and their val photos
(known), and every photo of the other 10 new classes (unknown).
Protocol "trained classes": gallery: the train photos of the 61 trained classes; queries:
all val photos (those of the 20 new classes unknown) and the train photos of the new ones.

Prints recall@1 (known queries), rejection (unknown queries) and their mean (balanced
accuracy) at each threshold asked for, and the threshold with the best balanced accuracy
on a sweep of `--step`.
"""

from __future__ import annotations

import atexit
import csv
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from arguments import benchmark_parser, checked_number, cosine_score, folder
from common import export_folders, grocery_root

from shitu.index import Gallery, GalleryItem
from shitu.inference import FeatureExtractor
from shitu.pipeline import Recognizer, evaluate_pipeline
from shitu.pipeline.defaults import MIN_SWEEP_STEP
from shitu.pipeline.evaluate import sweep_thresholds


def photos(root: Path, split: str, names: dict[int, str]) -> list[tuple[Path, int, str]]:
    rows = [line.split(",") for line in (root / f"{split}.txt").read_text().splitlines()]
    return [(root / r[0].strip(), int(r[1]), names[int(r[1])]) for r in rows if len(r) > 1]


# As `shitu eval-pipeline --sweep` takes it: 0 divided by zero after the libraries were
# built, and a negative step swept 1.0 alone.
sweep_step = checked_number(
    f"a step from {MIN_SWEEP_STEP} to 1", lambda step: MIN_SWEEP_STEP <= step <= 1
)


def protocols(root: Path) -> dict[str, tuple[list[GalleryItem], list[GalleryItem]]]:
    """name -> (gallery, queries)."""
    with (root / "classes.csv").open() as handle:
        names = {int(row[1]): row[0] for row in list(csv.reader(handle))[1:]}
    train, val = photos(root, "train", names), photos(root, "val", names)

    def items(rows: list[tuple[Path, int, str]]) -> list[GalleryItem]:
        return [GalleryItem(path, label) for path, _, label in rows]

    halves: dict[int, list[tuple[Path, int, str]]] = defaultdict(list)
    for row in sorted(train):
        if row[1] % 8 == 3:
            halves[row[1]].append(row)
    gallery = [row for rows in halves.values() for row in rows[: len(rows) // 2]]
    known = [row for rows in halves.values() for row in rows[len(rows) // 2 :]]
    known += [row for row in val if row[1] % 8 == 3]
    unknown = [row for row in val + train if row[1] % 8 == 7]
    trained = [row for row in train if row[1] % 4 != 3]
    new = [row for row in train if row[1] % 4 == 3]
    return {
        "new domain": (items(gallery), items(known + unknown)),
        "trained classes": (items(trained), items(val + new)),
    }


def main() -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--model", action="append", help="export folder, repeatable (default: the shipped model)"
    )
    parser.add_argument(
        "--thresholds",
        type=cosine_score,
        nargs="+",
        default=[0.5, 0.6, 0.7, 0.8],
        help="score thresholds tabled",
    )
    parser.add_argument("--step", type=sweep_step, default=0.05, help="sweep step for the best")
    parser.add_argument("--dataset", type=Path, default=grocery_root(), help="Grocery Store folder")
    parser.add_argument("--work", type=folder, help="keep the gallery libraries here")
    args = parser.parse_args()
    if not (args.dataset / "train.txt").is_file():
        sys.exit(f"{args.dataset}: no Grocery Store dataset (train.txt) there")
    models = export_folders(args.model)
    work = args.work or Path(tempfile.mkdtemp(prefix="shitu-open-set-"))
    if args.work is None:  # a scratch folder: gone when the table is printed
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    thresholds = sorted({*args.thresholds, *sweep_thresholds(args.step)})
    print("| model | protocol | known / unknown queries | score_thres | recall@1 | rejection "
          "| balanced accuracy |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|")
    for number, model in enumerate(models):
        extractor = FeatureExtractor.load(model)
        for name, (gallery_items, queries) in protocols(args.dataset).items():
            library = work / f"{number}-{name.replace(' ', '-')}"
            if not library.exists():
                with Gallery.create_for(library, extractor) as gallery:
                    gallery.add_files(extractor, gallery_items)
            # A Recognizer built from parts leaves them open: the library is closed here.
            with (
                Gallery.open(library, embedder=extractor) as gallery,
                Recognizer(extractor, gallery) as recognizer,
            ):
                report = evaluate_pipeline(recognizer, queries, sweep=thresholds)
            best = report.best_threshold()
            for point in report.sweep:
                if point.score_thres in args.thresholds or point is best:
                    mark = " (best)" if point is best else ""
                    print(
                        f"| {model} | {name} | {point.known_queries} / {point.unknown_queries} "
                        f"| {point.score_thres:g}{mark} | {point.recall_at_1:.4f} "
                        f"| {point.rejection:.4f} | {point.balanced_accuracy:.4f} |"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
