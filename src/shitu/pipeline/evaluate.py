"""End-to-end accuracy: is the best recognition of each labelled query photo right?

A query whose label has no image in the gallery is *unknown* (open set): its right
answer is nothing recognised. Known queries count towards recall@1, unknown ones towards
the rejection rate, and both towards the open-set accuracy. The pipeline embeds each
query once; results at other thresholds (`sweep`) come from the same scored candidates
through the recogniser's own selection, so they are what `shitu recognize` would return
at those thresholds.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from shitu.errors import ConfigError
from shitu.fileio import file_sha256
from shitu.index import GalleryItem
from shitu.index import gallery as index_gallery
from shitu.index.labels import check_label, normal_form
from shitu.pipeline.recognizer import Candidates, Recognizer
from shitu.progress import ImageProgress


@dataclass
class PipelineEvaluation:
    """Counts over the readable queries at one score threshold."""

    score_thres: float
    queries: int = 0
    correct: int = 0  # known queries whose best result has their label
    no_result: int = 0  # known queries with nothing recognised
    unknown_queries: int = 0  # queries whose label is not in the gallery
    unknown_rejected: int = 0  # ... with nothing recognised, as it should be
    in_gallery: int = 0  # queries that are gallery images themselves (each finds itself)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    mistakes: list[tuple[str, str, str]] = field(default_factory=list)  # path, truth, predicted
    sweep: list[PipelineEvaluation] = field(default_factory=list)

    @property
    def known_queries(self) -> int:
        """Queries whose label is in the gallery."""
        return self.queries - self.unknown_queries

    @property
    def recall_at_1(self) -> float | None:
        """Known queries answered with their label first (no result counts as wrong);
        None without known queries."""
        return self.correct / self.known_queries if self.known_queries else None

    @property
    def rejection(self) -> float | None:
        """Unknown queries answered with nothing; None without unknown queries."""
        return self.unknown_rejected / self.unknown_queries if self.unknown_queries else None

    @property
    def open_set_accuracy(self) -> float:
        """Right answers over all queries: the known label first, or nothing for unknowns."""
        return (self.correct + self.unknown_rejected) / self.queries if self.queries else 0.0

    @property
    def balanced_accuracy(self) -> float | None:
        """Mean of recall@1 and rejection, so neither side's query count dominates; None
        unless there are both known and unknown queries. Summed as exact fractions: two
        thresholds that tie (2/2 and 2/6, 1/2 and 5/6) get the same float, so that
        `best_threshold` takes the lower, not whichever the rounding favoured."""
        if not self.known_queries or not self.unknown_queries:
            return None
        recall = Fraction(self.correct, self.known_queries)
        rejection = Fraction(self.unknown_rejected, self.unknown_queries)
        return float((recall + rejection) / 2)

    def best_threshold(self) -> PipelineEvaluation | None:
        """The swept threshold with the highest balanced accuracy (the lowest on ties, so
        fewer known queries are turned away). None without unknown queries or a sweep, and
        when no threshold beats 0.5, what rejecting everything scores: then the known and
        unknown queries' scores overlap and no threshold tells them apart."""
        scored = [point for point in self.sweep if point.balanced_accuracy is not None]
        best = max(scored, key=lambda point: point.balanced_accuracy or 0.0, default=None)
        return best if best is not None and (best.balanced_accuracy or 0.0) > 0.5 else None

    def to_dict(self, digits: int | None = 5) -> dict[str, float | int | None]:
        """The counts and rates; rates rounded to `digits` (None: exact)."""

        def rounded(value: float | None) -> float | None:
            return value if value is None or digits is None else round(value, digits)

        report: dict[str, float | int | None] = {
            "score_thres": self.score_thres,
            "queries": self.queries,
            "recall@1": rounded(self.recall_at_1),
            "correct": self.correct,
            "no_result": self.no_result,
            "unreadable": len(self.unreadable),
        }
        if self.in_gallery:
            report["in_gallery"] = self.in_gallery
        if self.unknown_queries:
            report |= {
                "unknown_queries": self.unknown_queries,
                "unknown_rejected": self.unknown_rejected,
                "rejection": rounded(self.rejection),
                "open_set_accuracy": rounded(self.open_set_accuracy),
                "balanced_accuracy": rounded(self.balanced_accuracy),
            }
        return report


def evaluate_pipeline(
    recognizer: Recognizer,
    items: Iterable[GalleryItem],
    progress: bool = False,
    sweep: Sequence[float] = (),
) -> PipelineEvaluation:
    """Run the whole pipeline on each query at the recogniser's threshold, and at each
    threshold of `sweep` (reported in `.sweep`)."""
    # read three times: a generator would be empty after the first; a path or a (path,
    # label) pair failed on a missing attribute
    items = index_gallery.gallery_items(items, "evaluate_pipeline")
    # before any query is scored: one threshold alone failed at the end, after all of them
    if isinstance(sweep, str) or not isinstance(sweep, Iterable):
        raise ConfigError(f"sweep: expected a list of thresholds, got {sweep!r}; pass [{sweep!r}]")
    thresholds = sorted(sweep)
    gallery_labels = known_labels(recognizer)
    in_gallery = _gallery_images(recognizer, [item.path for item in items], progress)
    scored: list[tuple[str, str, Candidates]] = []
    unreadable: list[tuple[str, str]] = []
    files = recognizer.score_files([item.path for item in items], progress)
    for item, (path, candidates, error) in zip(items, files, strict=True):
        if candidates is None:
            unreadable.append((path, error or "unreadable"))
        else:  # as the library stores it: a folder name may be NFD (macOS) or padded
            scored.append((path, check_label(item.label), candidates))

    def count(threshold: float) -> PipelineEvaluation:
        # a plain float: a numpy sweep's float32 would break json.dumps of `to_dict()`
        threshold = float(threshold)
        report = PipelineEvaluation(threshold, unreadable=unreadable, in_gallery=in_gallery)
        for path, truth, candidates in scored:
            results = recognizer.select(candidates, threshold)
            predicted = normal_form(results[0].label) if results else ""
            known = truth in gallery_labels
            report.queries += 1
            if not known:
                report.unknown_queries += 1
                report.unknown_rejected += not results
            elif predicted == truth:
                report.correct += 1
            else:
                report.no_result += not results
            if predicted != (truth if known else ""):
                report.mistakes.append((path, truth, predicted))
        return report

    report = count(recognizer.score_thres)
    report.sweep = [count(threshold) for threshold in thresholds]
    return report


def known_labels(recognizer: Recognizer) -> set[str]:
    """The library's labels as queries' labels are compared (NFC): rows stored before labels
    were normalised may hold a name decomposed, and it is the same product all the same."""
    return {normal_form(label) for label in recognizer.gallery.label_counts()}


def _gallery_images(recognizer: Recognizer, paths: Sequence[str | Path], progress: bool) -> int:
    """How many of the query files are gallery images too (the same file, or a copy with
    the same content): those find themselves, and measure nothing. Each file is read whole
    for its hash: `progress` draws a `hashing` bar for HASH_BAR_MIN_FILES files or more,
    as `index add` does, so that a large query set does not sit silent before its
    recognition bar."""
    entries = recognizer.gallery.entries()
    stored_paths = {os.path.realpath(entry.path) for entry in entries}
    stored_hashes = {entry.sha256 for entry in entries if entry.sha256}
    count = 0
    enabled = progress and len(paths) >= index_gallery.HASH_BAR_MIN_FILES
    with ImageProgress(len(paths), enabled, "hashing") as bar:
        for path in paths:
            if os.path.realpath(path) in stored_paths:
                count += 1
            else:
                with contextlib.suppress(OSError):  # reported as unreadable by the evaluation
                    count += file_sha256(Path(path)) in stored_hashes
            bar.update(1)
    return count


def sweep_thresholds(step: float) -> list[float]:
    """0, step, 2 step, ... up to 1, rounded so that they print as typed."""
    count = math.floor(1 / step + 1e-9)
    return sorted({round(i * step, 6) for i in range(count + 1)} | {1.0})
