"""Retrieval metrics for a query set searched against a gallery.

Definitions (per query, over its ranked gallery; a *positive* is a gallery item with the
query's label that is not excluded by the same-id rule: with ids given, gallery items with
the query's id *and* label are left out, PaddleClas's rule, which drops a query's own entry
when ids name images and same-camera views of the same object when they name cameras):

- Recall@k (CMC, PaddleClas's `Recallk`): 1 if any of the top k items is a positive.
- Precision@k: number of positives among the top k, divided by k (also when fewer than k
  gallery items remain after exclusion).
- AP: mean over all positives of the precision at that positive's rank (whole gallery).
- INP (Ye et al., "Deep Learning for Person Re-id: A Survey and Outlook"): number of
  positives divided by the rank of the last-ranked positive.

Each metric is averaged over the queries that have at least one positive; the others are
counted in `RetrievalResult.num_queries_without_positive`.

Ranking and ties: items are ordered by cosine similarity, highest first (or by re-ranked
distance, lowest first); items with equal scores keep gallery-index order (stable sort), so
a positive tied with a negative ranks by index. Equal here means equal floats: identical
vectors tie exactly, but distinct vectors with mathematically equal similarities can differ
in the last bit with the size of the matrix product, so such near-ties may order differently
with another `block_size`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from shitu.errors import ConfigError, ShituError, did_you_mean
from shitu.evaluation.reranking import ReRanking, distinct_rows, k_reciprocal_distances
from shitu.values import is_whole_number, read_switch_word

# Working memory the default query block may use: ~7 bytes per query-gallery score (float32
# scores, three bool masks) -> ~380 queries per block at G = 100k; add ~50 bytes per positive
# (their ranks), which only matters when a few labels fill the gallery, and one query's sort
# of the items that outrank its lowest positive (at most ~25 bytes per gallery item).
DEFAULT_BLOCK_BYTES = 256 * 2**20

_METRIC_PARAMS: dict[str, tuple[str, ...]] = {
    "Recallk": ("topk", "descending"),
    "Precisionk": ("topk", "descending"),
    "mAP": ("descending",),
    "mINP": ("descending",),
}
_DEFAULT_TOPK = (1, 5)  # PaddleClas's default for Recallk / Precisionk
_RERANK_KEYS = ("k1", "k2", "lambda_value", "max_samples")


class EvaluationInputError(ShituError, ValueError):
    """Features, labels or ids that cannot be evaluated (shapes, dtypes, empty sets)."""


@dataclass(frozen=True)
class RetrievalResult:
    """Metric values (fractions in [0, 1]) and how many queries they average over."""

    metrics: dict[str, float]
    num_queries: int  # all queries given, including those without a positive
    num_queries_without_positive: int

    @property
    def num_evaluated(self) -> int:
        return self.num_queries - self.num_queries_without_positive

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]

    def summary(self) -> str:
        """One log line, e.g. 'recall@1: 0.8125, mAP: 0.6002 (16 queries, 1 without a
        positive, not counted)'."""
        values = ", ".join(f"{name}: {value:.4f}" for name, value in self.metrics.items())
        skipped = self.num_queries_without_positive
        note = f", {skipped} without a positive, not counted" if skipped else ""
        return f"{values} ({self.num_queries} queries{note})"


@dataclass(frozen=True)
class RetrievalEvaluator:
    """Which retrieval metrics to compute, and how (query block size, optional re-ranking).

    block_size: queries scored against the whole gallery at once; None picks the largest
    block whose working set (~7 bytes per score) fits in `DEFAULT_BLOCK_BYTES`.
    """

    recall_k: tuple[int, ...] = _DEFAULT_TOPK
    precision_k: tuple[int, ...] = ()
    map: bool = True
    minp: bool = False
    block_size: int | None = None
    re_ranking: ReRanking | None = None
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "recall_k", _check_topk(self.recall_k, "recall_k"))
        object.__setattr__(self, "precision_k", _check_topk(self.precision_k, "precision_k"))
        if self.block_size is not None:
            if not is_whole_number(self.block_size) or self.block_size < 1:
                raise ConfigError(
                    f"block_size: must be a positive integer, got {self.block_size!r}"
                )
            object.__setattr__(self, "block_size", int(self.block_size))
        names = (
            [f"recall@{k}" for k in self.recall_k]
            + [f"precision@{k}" for k in self.precision_k]
            + (["mAP"] if self.map else [])
            + (["mINP"] if self.minp else [])
        )
        if not names:
            raise ConfigError("no retrieval metric requested (Recallk, Precisionk, mAP or mINP)")
        object.__setattr__(self, "_names", tuple(names))

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Keys of `RetrievalResult.metrics`, e.g. to validate `Global.eval_metric`."""
        return self._names

    @classmethod
    def from_metric_config(
        cls,
        items: list[dict[str, dict[str, Any] | None]] | None,
        re_ranking: bool | dict[str, Any] | None = False,
    ) -> RetrievalEvaluator:
        """Build from a PaddleClas-style `Metric.Eval` list and `Global.re_ranking`.

        Entries are `{Recallk: {topk: [1, 5]}}`, `{Precisionk: {topk: 5}}`, `{mAP: {}}`,
        `{mINP: {}}`; the same metric may appear twice (its k lists are merged). An empty or
        missing list means recall@1, recall@5 and mAP. `re_ranking` is a bool or a dict of
        `ReRanking` fields.
        """
        if items is None or items == []:
            return cls(re_ranking=_re_ranking_from(re_ranking))
        if not isinstance(items, list):
            raise ConfigError(
                f"Metric.Eval: expected a list of {{name: params}} entries, got {items!r}"
            )
        recall: list[int] = []
        precision: list[int] = []
        want_map = want_minp = False
        for index, item in enumerate(items):
            where = f"Metric.Eval[{index}]"
            if not isinstance(item, dict) or len(item) != 1:
                raise ConfigError(f"{where}: expected one {{name: params}} entry, got {item!r}")
            ((name, params),) = item.items()
            if name not in _METRIC_PARAMS:
                raise ConfigError(
                    f"{where}: unknown retrieval metric '{name}'{_hint(name, list(_METRIC_PARAMS))}"
                    f"; available: {', '.join(_METRIC_PARAMS)}"
                )
            params = {} if params is None else params
            if not isinstance(params, dict):
                raise ConfigError(
                    f"{where}.{name}: expected a mapping of parameters, got {params!r}"
                )
            for key in params:
                if key not in _METRIC_PARAMS[name]:
                    allowed = list(_METRIC_PARAMS[name])
                    raise ConfigError(
                        f"{where}.{name}.{key}: unknown parameter{_hint(str(key), allowed)}; "
                        f"{name} takes: {', '.join(allowed)}"
                    )
            if read_switch_word(params.get("descending", True)) is not True:
                raise ConfigError(
                    f"{where}.{name}.descending: only true (higher similarity ranks first) is "
                    f"supported, got {params['descending']!r}"
                )
            if name in ("Recallk", "Precisionk"):
                topk = params.get("topk", _DEFAULT_TOPK)
                ks = _check_topk(topk, f"{where}.{name}.topk")
                if not ks:
                    raise ConfigError(f"{where}.{name}.topk: must not be empty")
                (recall if name == "Recallk" else precision).extend(ks)
            elif name == "mAP":
                want_map = True
            else:
                want_minp = True
        return cls(
            recall_k=tuple(recall),
            precision_k=tuple(precision),
            map=want_map,
            minp=want_minp,
            re_ranking=_re_ranking_from(re_ranking),
        )

    def evaluate(
        self,
        query_features: Tensor,
        query_labels: Tensor,
        gallery_features: Tensor,
        gallery_labels: Tensor,
        query_ids: Tensor | None = None,
        gallery_ids: Tensor | None = None,
    ) -> RetrievalResult:
        """Rank the gallery for every query and average the metrics over the queries.

        Features are [N, D] float tensors (L2-normalised here), labels and the optional
        unique ids are integer [N] (or [N, 1]) tensors. Gallery items with the query's id
        and label are left out of that query's ranking, which is how a set is evaluated
        against itself. Computes on the query features' device.

        Peak memory besides the normalised feature copies (and, while copies of a gallery
        vector are looked for, a sorted one of the gallery's): about 7 * block * G bytes for the
        query block's scores (float32; ~270 MB for the default block at G = 100k), plus ~50
        bytes per positive in the block (a gallery of few labels: up to ~8x), and where the
        gallery holds copies of a vector, the block's scores of its distinct vectors.
        Re-ranking instead holds dense (Q+G)^2 matrices; see `k_reciprocal_distances`.
        """
        q_feat, g_feat = check_features(query_features, gallery_features)
        device = q_feat.device
        q_labels = _check_ids(query_labels, len(q_feat), "query_labels", device)
        g_labels = _check_ids(gallery_labels, len(g_feat), "gallery_labels", device)
        if (query_ids is None) != (gallery_ids is None):
            raise EvaluationInputError("query_ids and gallery_ids must be given together")
        q_ids = g_ids = None
        if query_ids is not None and gallery_ids is not None:
            q_ids = _check_ids(query_ids, len(q_feat), "query_ids", device)
            g_ids = _check_ids(gallery_ids, len(g_feat), "gallery_ids", device)

        dtype = torch.float64 if torch.float64 in (q_feat.dtype, g_feat.dtype) else torch.float32
        # Scored in float32 (or float64) also when called under autocast, whose bf16 matmul
        # would round the similarities and reorder close gallery items.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            if self.re_ranking is not None:
                rr = self.re_ranking
                dist = k_reciprocal_distances(
                    q_feat, g_feat, rr.k1, rr.k2, rr.lambda_value, rr.max_samples
                )

                def scores(start: int, stop: int) -> Tensor:
                    return -dist[start:stop]
            else:
                q_unit = F.normalize(q_feat.to(device, dtype), dim=1)
                # Copies of one gallery vector are scored once, so that they tie exactly
                # and rank in gallery order (see `distinct_rows`).
                g_unit, copies = distinct_rows(F.normalize(g_feat.to(device, dtype), dim=1))

                def scores(start: int, stop: int) -> Tensor:
                    block_scores = q_unit[start:stop] @ g_unit.T
                    return block_scores if copies is None else block_scores[:, copies]

            block = self.block_size or _default_block(len(g_feat), torch.finfo(dtype).bits // 8)
            stats = _rank_statistics(
                scores, q_labels, g_labels, q_ids, g_ids, block, self.precision_k
            )
        return self._summarise(stats)

    def _summarise(self, stats: _QueryStats) -> RetrievalResult:
        has_positive = stats.num_positives > 0
        num_queries = len(has_positive)
        num_evaluated = int(has_positive.sum())
        if num_evaluated == 0:
            raise EvaluationInputError(
                f"none of the {num_queries} queries has a positive (same label, different id) "
                "in the gallery, so no retrieval metric is defined"
            )
        first = stats.first_rank[has_positive]
        metrics: dict[str, float] = {}
        for k in self.recall_k:
            metrics[f"recall@{k}"] = (first <= k).double().mean().item()
        for k, hits in zip(self.precision_k, stats.hits_at_k, strict=True):
            metrics[f"precision@{k}"] = (hits[has_positive] / k).mean().item()
        if self.map:
            metrics["mAP"] = stats.average_precision[has_positive].mean().item()
        if self.minp:
            inp = stats.num_positives[has_positive] / stats.last_rank[has_positive]
            metrics["mINP"] = inp.mean().item()
        return RetrievalResult(metrics, num_queries, num_queries - num_evaluated)


def evaluate_retrieval(
    query_features: Tensor,
    query_labels: Tensor,
    gallery_features: Tensor,
    gallery_labels: Tensor,
    *,
    query_ids: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    recall_k: Sequence[int] = _DEFAULT_TOPK,
    precision_k: Sequence[int] = (),
    map: bool = True,
    minp: bool = False,
    block_size: int | None = None,
    re_ranking: ReRanking | None = None,
) -> RetrievalResult:
    """Function form of `RetrievalEvaluator(...).evaluate(...)`."""
    evaluator = RetrievalEvaluator(
        recall_k=tuple(recall_k),
        precision_k=tuple(precision_k),
        map=map,
        minp=minp,
        block_size=block_size,
        re_ranking=re_ranking,
    )
    return evaluator.evaluate(
        query_features, query_labels, gallery_features, gallery_labels, query_ids, gallery_ids
    )


@dataclass
class _QueryStats:
    """Per-query quantities every metric is derived from (ranks are 1-based)."""

    num_positives: Tensor  # int64 [Q]
    first_rank: Tensor  # float64 [Q]; 0 where there is no positive
    last_rank: Tensor  # float64 [Q]; 1 where there is no positive
    average_precision: Tensor  # float64 [Q]
    hits_at_k: list[Tensor]  # float64 [Q] per precision k: positives within the top k


def _rank_statistics(
    scores: Callable[[int, int], Tensor],
    q_labels: Tensor,
    g_labels: Tensor,
    q_ids: Tensor | None,
    g_ids: Tensor | None,
    block: int,
    precision_k: tuple[int, ...],
) -> _QueryStats:
    """Ranks of every query's positives, one block of queries at a time.

    Only [block, G] tensors are alive; each query sorts just the items that can outrank one
    of its positives (see `_positive_ranks`).
    """
    num_q, device = len(q_labels), q_labels.device
    f64 = {"dtype": torch.float64, "device": device}
    stats = _QueryStats(
        num_positives=torch.zeros(num_q, dtype=torch.long, device=device),
        first_rank=torch.zeros(num_q, **f64),
        last_rank=torch.ones(num_q, **f64),
        average_precision=torch.zeros(num_q, **f64),
        hits_at_k=[torch.zeros(num_q, **f64) for _ in precision_k],
    )
    for start in range(0, num_q, block):
        stop = min(num_q, start + block)
        block_scores = scores(start, stop)
        positive = q_labels[start:stop, None] == g_labels[None, :]
        if q_ids is not None and g_ids is not None:
            same = (q_ids[start:stop, None] == g_ids[None, :]) & positive  # PaddleClas's rule
            # Excluded items sink below every finite score and are never positives, so they
            # cannot change the rank of any positive.
            block_scores.masked_fill_(same, float("-inf"))  # `scores` returns a fresh tensor
            positive &= ~same
            del same
        count, rows, ranks = _positive_ranks(block_scores, positive)
        del block_scores, positive
        offset = count.cumsum(0) - count
        ordinal = torch.arange(len(rows), device=device) - offset[rows] + 1
        found = count > 0
        span = slice(start, stop)
        stats.num_positives[span] = count
        stats.first_rank[span][found] = ranks[offset[found]]
        stats.last_rank[span][found] = ranks[offset[found] + count[found] - 1]
        precision_at_hits = torch.zeros(stop - start, **f64).index_add_(0, rows, ordinal / ranks)
        stats.average_precision[span] = precision_at_hits / count.clamp(min=1)
        for k, hits in zip(precision_k, stats.hits_at_k, strict=True):
            hits[span] = torch.zeros(stop - start, **f64).index_add_(0, rows, (ranks <= k).double())
    return stats


def _positive_ranks(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's number of positives, and each positive's row and 1-based rank (float64),
    row by row in rank order.

    An item scoring below a query's lowest positive ranks after all of its positives, so
    only the others (a small share of the gallery for a useful model) are sorted, not the
    whole gallery per query: the same ranks, as the sort is stable and keeps the gallery
    order of the items it sorts. Positives are counted per row too: summing the whole
    [block, G] mask would first copy it as int64, 8 bytes per score.
    """
    device = scores.device
    counts: list[int] = []
    empty = torch.zeros(0, dtype=torch.long, device=device)
    rows, ranks = [empty], [empty]
    for row, (row_scores, row_positive) in enumerate(zip(scores, positive, strict=True)):
        cols = row_positive.nonzero().squeeze(1)
        counts.append(len(cols))
        if not len(cols):
            continue
        contenders = (row_scores >= row_scores[cols].min()).nonzero().squeeze(1)
        order = torch.sort(row_scores[contenders], descending=True, stable=True).indices
        ranks.append(row_positive[contenders[order]].nonzero().squeeze(1) + 1)
        rows.append(torch.full((len(cols),), row, device=device))
    count = torch.tensor(counts, dtype=torch.long, device=device)
    return count, torch.cat(rows), torch.cat(ranks).double()


def _default_block(num_gallery: int, score_bytes: int) -> int:
    per_query = num_gallery * (score_bytes + 3)
    return max(1, DEFAULT_BLOCK_BYTES // per_query)


def check_features(query_features: Any, gallery_features: Any) -> tuple[Tensor, Tensor]:
    """Query and gallery features as evaluation and re-ranking take them: non-empty [N, D]
    float tensors of finite values and one dimension D; an EvaluationInputError naming
    what is wrong else."""
    q_feat = _check_features(query_features, "query_features")
    g_feat = _check_features(gallery_features, "gallery_features")
    if q_feat.shape[1] != g_feat.shape[1]:
        raise EvaluationInputError(
            f"query features have dimension {q_feat.shape[1]} but gallery features have "
            f"{g_feat.shape[1]}"
        )
    return q_feat, g_feat


def _check_features(features: Any, name: str) -> Tensor:
    if not isinstance(features, Tensor):
        raise EvaluationInputError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise EvaluationInputError(
            f"{name} must be a 2-D [N, D] tensor, got shape {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise EvaluationInputError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise EvaluationInputError(f"{name} is empty (shape {tuple(features.shape)})")
    if not bool(torch.isfinite(features).all()):
        raise EvaluationInputError(f"{name} contains NaN or infinite values")
    return features


def _check_ids(values: Any, length: int, name: str, device: torch.device) -> Tensor:
    """Labels or unique ids: an integer tensor with one entry per feature row."""
    if not isinstance(values, Tensor):
        raise EvaluationInputError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise EvaluationInputError(f"{name} must be an integer tensor, got {values.dtype}")
    if values.dim() == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.dim() != 1:
        raise EvaluationInputError(
            f"{name} must have shape [N] or [N, 1], got {tuple(values.shape)}"
        )
    if len(values) != length:
        raise EvaluationInputError(
            f"{name} has {len(values)} entries but the features have {length} rows"
        )
    return values.to(device=device, dtype=torch.long)


def _check_topk(value: Any, where: str) -> tuple[int, ...]:
    """A positive int or a list of them -> sorted unique tuple."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    for k in values:
        if not is_whole_number(k) or k < 1:
            raise ConfigError(
                f"{where}: must be a positive integer or a list of them, got {value!r}"
            )
    return tuple(sorted({int(k) for k in values}))


def _hint(name: str, choices: list[str]) -> str:
    """did_you_mean, plus case-insensitive matches such as 'map' -> 'mAP'."""
    folded = [c for c in choices if c.lower() == name.lower()]
    return f" (did you mean '{folded[0]}'?)" if folded else did_you_mean(name, choices)


def _re_ranking_from(value: bool | dict[str, Any] | None) -> ReRanking | None:
    if value is None or value is False:
        return None
    if value is True:
        return ReRanking()
    if isinstance(value, dict):
        params = dict(value)
        if "lambda" in params:  # the paper's and PaddleClas's name
            if "lambda_value" in params:
                raise ConfigError(
                    "Global.re_ranking: lambda and lambda_value are one setting; give one"
                )
            params["lambda_value"] = params.pop("lambda")
        for key in params:
            if key not in _RERANK_KEYS:
                hint = _hint(str(key), list(_RERANK_KEYS))
                raise ConfigError(
                    f"Global.re_ranking.{key}: unknown parameter{hint}; "
                    f"re-ranking takes: {', '.join(_RERANK_KEYS)}"
                )
        return ReRanking(**params)
    raise ConfigError(f"Global.re_ranking: expected true/false or a mapping, got {value!r}")
