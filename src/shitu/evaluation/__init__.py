"""Retrieval evaluation: Recall@k, Precision@k, mAP and mINP over a query set and a gallery,
with optional k-reciprocal re-ranking."""

from shitu.evaluation.reranking import (
    DEFAULT_MAX_SAMPLES,
    ReRanking,
    ReRankingTooLargeError,
    k_reciprocal_distances,
)
from shitu.evaluation.retrieval import (
    EvaluationInputError,
    RetrievalEvaluator,
    RetrievalResult,
    evaluate_retrieval,
)

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "EvaluationInputError",
    "ReRanking",
    "ReRankingTooLargeError",
    "RetrievalEvaluator",
    "RetrievalResult",
    "evaluate_retrieval",
    "k_reciprocal_distances",
]
