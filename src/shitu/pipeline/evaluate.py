"""End-to-end accuracy: is the best recognition of each labelled query photo right?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shitu.index import GalleryItem
from shitu.pipeline.recognizer import Recognizer


@dataclass
class PipelineEvaluation:
    """Counts over the readable queries; `recall_at_1` counts no-result queries as wrong."""

    queries: int = 0
    correct: int = 0
    no_result: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    mistakes: list[tuple[str, str, str]] = field(default_factory=list)  # path, truth, predicted

    @property
    def recall_at_1(self) -> float:
        return self.correct / self.queries if self.queries else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "queries": self.queries,
            "recall@1": round(self.recall_at_1, 5),
            "correct": self.correct,
            "no_result": self.no_result,
            "unreadable": len(self.unreadable),
        }


def evaluate_pipeline(
    recognizer: Recognizer, items: Sequence[GalleryItem], progress: bool = False
) -> PipelineEvaluation:
    """Run the whole pipeline on each query; its top result's label must be the query's."""
    truth = [item.label for item in items]
    report = PipelineEvaluation()
    for item_label, found in zip(
        truth, recognizer.recognize_files([item.path for item in items], progress), strict=True
    ):
        if found.error is not None:
            report.unreadable.append((found.path, found.error))
            continue
        report.queries += 1
        if not found.results:
            report.no_result += 1
            report.mistakes.append((found.path, item_label, ""))
        elif found.results[0].label == item_label:
            report.correct += 1
        else:
            report.mistakes.append((found.path, item_label, found.results[0].label))
    return report
