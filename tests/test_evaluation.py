"""Retrieval metrics and k-reciprocal re-ranking, checked against hand-computed values, naive
full-matrix references written here, and pytorch-metric-learning's AccuracyCalculator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shitu.errors import ConfigError, ShituError
from shitu.evaluation import (
    EvaluationInputError,
    ReRanking,
    ReRankingTooLargeError,
    RetrievalEvaluator,
    evaluate_retrieval,
    k_reciprocal_distances,
    retrieval,
)
from shitu.evaluation.reranking import check_rerank_size

ALL_METRICS = {"recall_k": (1, 2, 5, 10), "precision_k": (1, 3, 5, 300), "map": True, "minp": True}


# --------------------------------------------------------------------------- references


def naive_metrics(
    qf: np.ndarray,
    ql: np.ndarray,
    gf: np.ndarray,
    gl: np.ndarray,
    recall_k: tuple[int, ...],
    precision_k: tuple[int, ...],
    qid: np.ndarray | None = None,
    gid: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> tuple[dict[str, float], int]:
    """Full score matrix, Python sort per query: (metrics, queries without a positive).

    Ranking: score descending, ties by gallery index; items with the query's id and label
    removed from the list.
    """
    if scores is None:
        qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
        scores = qn @ gn.T
    per_query: dict[str, list[float]] = {}
    skipped = 0
    for i in range(len(ql)):
        items = [j for j in range(len(gl)) if qid is None or (qid[i], ql[i]) != (gid[j], gl[j])]
        ranked = sorted(items, key=lambda j: (-scores[i, j], j))
        relevant = [gl[j] == ql[i] for j in ranked]
        pos_ranks = [r + 1 for r, rel in enumerate(relevant) if rel]
        if not pos_ranks:
            skipped += 1
            continue
        values = {f"recall@{k}": float(pos_ranks[0] <= k) for k in recall_k}
        values |= {f"precision@{k}": sum(relevant[:k]) / k for k in precision_k}
        values["mAP"] = float(np.mean([(n + 1) / r for n, r in enumerate(pos_ranks)]))
        values["mINP"] = len(pos_ranks) / pos_ranks[-1]
        for key, value in values.items():
            per_query.setdefault(key, []).append(value)
    return {key: float(np.mean(v)) for key, v in per_query.items()}, skipped


def naive_rerank(qf: np.ndarray, gf: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """k-reciprocal re-ranking written as loops straight from the paper's algorithm."""
    feats = np.concatenate([qf, gf]).astype(np.float64)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    dist = np.clip(2 - 2 * feats @ feats.T, 0, None)
    dist = (dist + dist.T) / 2
    dist /= dist.max(axis=1, keepdims=True)
    n, n_q = len(feats), len(qf)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> list[int]:
        return [int(c) for c in rank[i, : k + 1] if i in rank[c, : k + 1]]

    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, round(k1 / 2))
            if len(set(rc) & set(r)) > 2.0 / 3 * len(rc):
                expanded |= set(rc)
        idx = sorted(expanded)
        weight = np.exp(-dist[i, idx])
        v[i, idx] = weight / weight.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.empty((n_q, n - n_q))
    for i in range(n_q):
        for j in range(n - n_q):
            inter = np.minimum(v[i], v[n_q + j]).sum()
            jaccard[i, j] = 1 - inter / (2 - inter)
    return jaccard * (1 - lam) + dist[:n_q, n_q:] * lam


def random_set(
    seed: int, num_q: int, num_g: int, dim: int = 16, classes: int = 12, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clustered features (so metrics are far from 0 and 1) with integer labels."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen, dtype=dtype)
    ql = torch.randint(0, classes, (num_q,), generator=gen)
    gl = torch.randint(0, classes, (num_g,), generator=gen)
    qf = centers[ql] + 1.2 * torch.randn(num_q, dim, generator=gen, dtype=dtype)
    gf = centers[gl] + 1.2 * torch.randn(num_g, dim, generator=gen, dtype=dtype)
    return qf, ql, gf, gl


def assert_matches(result_metrics: dict[str, float], expected: dict[str, float]) -> None:
    assert set(result_metrics) == set(expected)
    for key, value in expected.items():
        assert result_metrics[key] == pytest.approx(value, abs=1e-12), key


# --------------------------------------------------------------------------- hand-computed


def ranking_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gallery items are one-hot vectors, so a query's cosine score for item j is q[j]/|q|
    and each query row spells out its ranking. Gallery labels: [0, 1, 0, 2, 1, 0].

    q0 (label 0): order 0,1,2,3,4,5 -> labels 0,1,0,2,1,0 -> positives at ranks 1, 3, 6
    q1 (label 1): order 3,0,5,1,2,4 -> labels 2,0,0,1,0,1 -> positives at ranks 4, 6
    q2 (label 7): no positive
    q3 (label 2): order 4,3,0,1,2,5 -> labels 1,2,0,1,0,0 -> positive at rank 2
    """
    gallery = torch.eye(6)
    gallery_labels = torch.tensor([0, 1, 0, 2, 1, 0])
    queries = torch.tensor(
        [
            [6.0, 5, 4, 3, 2, 1],
            [5.0, 3, 2, 6, 1, 4],
            [1.0, 2, 3, 4, 5, 6],
            [4.0, 3, 2, 5, 6, 1],
        ]
    )
    query_labels = torch.tensor([0, 1, 7, 2])
    return queries, query_labels, gallery, gallery_labels


def test_hand_computed_metrics() -> None:
    result = evaluate_retrieval(*ranking_case(), recall_k=(1, 5), precision_k=(1, 5), minp=True)
    # AP: q0 (1/1 + 2/3 + 3/6)/3 = 13/18, q1 (1/4 + 2/6)/2 = 7/24, q3 1/2.
    # INP: q0 3/6, q1 2/6, q3 1/2.  P@5: q0 2/5, q1 1/5, q3 1/5.
    expected = {
        "recall@1": 1 / 3,
        "recall@5": 1.0,
        "precision@1": 1 / 3,
        "precision@5": (2 / 5 + 1 / 5 + 1 / 5) / 3,
        "mAP": (13 / 18 + 7 / 24 + 1 / 2) / 3,
        "mINP": (1 / 2 + 1 / 3 + 1 / 2) / 3,
    }
    assert list(result.metrics) == list(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    assert result.num_queries == 4
    assert result.num_queries_without_positive == 1
    assert result.num_evaluated == 3
    assert "1 without a positive" in result.summary()


def test_numpy_numbers_are_taken_as_settings() -> None:
    """np.arange(1, 6) for the ks (or a numpy k1) was refused as "must be a positive
    integer ... got (np.int64(1), ...)", which it is; a float32 lambda as no number."""
    result = evaluate_retrieval(
        *ranking_case(),
        recall_k=np.arange(1, 3),
        precision_k=[np.int64(5)],
        block_size=np.int32(2),
        re_ranking=ReRanking(k1=np.int64(4), k2=np.int64(1), lambda_value=np.float32(0.5)),
    )
    expected = evaluate_retrieval(
        *ranking_case(),
        recall_k=(1, 2),
        precision_k=(5,),
        block_size=2,
        re_ranking=ReRanking(k1=4, k2=1, lambda_value=0.5),
    )
    assert result.metrics == expected.metrics
    assert list(result.metrics) == ["recall@1", "recall@2", "precision@5", "mAP"]


def test_hand_computed_same_id_exclusion() -> None:
    """q0 shares its id with gallery item 0 (its rank-1 positive): its list becomes
    1,2,3,4,5 -> labels 1,0,2,1,0 -> positives at ranks 2, 5. q3 shares its id with item 4,
    but not its label: PaddleClas's rule leaves out only items with the query's id *and*
    label, so that negative stays at rank 1 and q3's positive at rank 2. q1 and q2 are
    unaffected."""
    queries, query_labels, gallery, gallery_labels = ranking_case()
    result = evaluate_retrieval(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        query_ids=torch.tensor([100, 101, 102, 104]),
        gallery_ids=torch.tensor([100, 201, 202, 203, 104, 205]),
        recall_k=(1, 2),
        precision_k=(5,),
        minp=True,
    )
    expected = {
        "recall@1": 0.0,
        "recall@2": (1 + 0 + 1) / 3,
        "precision@5": (2 / 5 + 1 / 5 + 1 / 5) / 3,
        "mAP": ((1 / 2 + 2 / 5) / 2 + 7 / 24 + 1 / 2) / 3,
        "mINP": (2 / 5 + 2 / 6 + 1 / 2) / 3,
    }
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    assert result.num_queries_without_positive == 1


# --------------------------------------------------------------------------- naive reference


@pytest.mark.parametrize("block_size", [None, 1, 3, 7, 50])
def test_matches_naive_reference(block_size: int | None) -> None:
    qf, ql, gf, gl = random_set(seed=1, num_q=50, num_g=200)
    ql[:4] = 99  # queries whose label is absent from the gallery
    result = evaluate_retrieval(qf, ql, gf, gl, block_size=block_size, **ALL_METRICS)
    expected, skipped = naive_metrics(
        qf.numpy(), ql.numpy(), gf.numpy(), gl.numpy(), (1, 2, 5, 10), (1, 3, 5, 300)
    )
    assert_matches(result.metrics, expected)
    assert result.num_queries_without_positive == skipped == 4
    assert 0.1 < result["mAP"] < 0.9  # the case is neither trivial nor hopeless


@pytest.mark.parametrize("block_size", [None, 3])
def test_matches_naive_reference_with_same_id_exclusion(block_size: int | None) -> None:
    """Query set == gallery set, each item excluded from its own ranking; items that are the
    only member of their class have no positive left."""
    feats, labels, _, _ = random_set(seed=2, num_q=60, num_g=1, classes=15)
    labels[:3] = torch.tensor([100, 101, 102])
    ids = torch.arange(60) + 1000
    result = evaluate_retrieval(
        feats,
        labels,
        feats,
        labels,
        query_ids=ids,
        gallery_ids=ids,
        block_size=block_size,
        **ALL_METRICS,
    )
    arr, lab = feats.numpy(), labels.numpy()
    expected, skipped = naive_metrics(
        arr, lab, arr, lab, (1, 2, 5, 10), (1, 3, 5, 300), ids.numpy(), ids.numpy()
    )
    assert_matches(result.metrics, expected)
    assert result.num_queries_without_positive == skipped >= 3
    # Without the exclusion every query finds itself first.
    assert evaluate_retrieval(feats, labels, feats, labels)["recall@1"] == 1.0


def test_ties_follow_gallery_index_order() -> None:
    """+-1 features in 16-D give exactly representable cosine scores with many exact ties;
    the reference breaks them by gallery index, and so must the blocked sort."""
    gen = torch.Generator().manual_seed(3)
    qf = torch.randint(0, 2, (30, 16), generator=gen).float() * 2 - 1
    gf = torch.randint(0, 2, (120, 16), generator=gen).float() * 2 - 1
    gf[60:] = gf[:60]  # exact duplicates too
    ql = torch.randint(0, 4, (30,), generator=gen)
    gl = torch.randint(0, 4, (120,), generator=gen)
    qid = torch.arange(30)
    gid = torch.arange(120) % 40  # several gallery items share an id with a query
    scores = (qf @ gf.T).double().numpy() / 16
    for ids in [(None, None), (qid, gid)]:
        result = evaluate_retrieval(
            qf, ql, gf, gl, query_ids=ids[0], gallery_ids=ids[1], block_size=4, **ALL_METRICS
        )
        np_ids = [None if x is None else x.numpy() for x in ids]
        expected, skipped = naive_metrics(
            None, ql.numpy(), None, gl.numpy(), (1, 2, 5, 10), (1, 3, 5, 300), *np_ids, scores
        )
        assert_matches(result.metrics, expected)
        assert result.num_queries_without_positive == skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_gallery_vectors_tie_for_a_query_alone_in_its_block(dtype) -> None:
    """Seven copies of one gallery vector, one of them the positive: its rank is its index
    + 1 whether the query is scored alone (a one-query block, e.g. the last one) or with
    others. A one-row product takes BLAS's matrix-vector path, which rounds the columns past
    its unrolled width differently, so the copies did not tie there."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        gallery = torch.randn(1, 64, generator=gen, dtype=dtype).repeat(7, 1)
        queries = torch.randn(2, 64, generator=gen, dtype=dtype)
        for positive in range(7):
            labels = torch.ones(7, dtype=torch.long)
            labels[positive] = 0
            for block_size in (1, 2):
                result = evaluate_retrieval(
                    queries, torch.tensor([0, 0]), gallery, labels, block_size=block_size
                )
                assert result["mAP"] == 1 / (positive + 1), (positive, block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copies_of_a_gallery_vector_tie_in_any_block_of_queries(dtype) -> None:
    """A photo listed several times: its copies must rank in gallery order, so the one
    positive among them ranks by its index, whatever the block of queries and the width. A
    matrix product of two or more rows rounded the copies in its edge tiles (here the last
    columns of seven) otherwise than the rest in the last bit, so they did not tie."""
    gen = torch.Generator().manual_seed(11)
    for dim in (64, 512):
        for copies in (7, 37):
            gallery = torch.randn(1, dim, generator=gen, dtype=dtype).repeat(copies, 1)
            queries = torch.randn(5, dim, generator=gen, dtype=dtype)
            for positive in (0, copies // 2, copies - 1):
                labels = torch.ones(copies, dtype=torch.long)
                labels[positive] = 0
                for block_size in (1, 2, 5):
                    result = evaluate_retrieval(
                        queries,
                        torch.zeros(5, dtype=torch.long),
                        gallery,
                        labels,
                        block_size=block_size,
                    )
                    assert result["mAP"] == 1 / (positive + 1), (dim, copies, positive, block_size)


def test_float32_and_labels_as_column() -> None:
    """float32 features and [N, 1] labels (as label files load) give the same numbers."""
    qf, ql, gf, gl = random_set(seed=4, num_q=40, num_g=150)
    ref = evaluate_retrieval(qf, ql, gf, gl, **ALL_METRICS)
    got = evaluate_retrieval(qf.float(), ql[:, None], gf.float(), gl[:, None], **ALL_METRICS)
    for key, value in ref.metrics.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("re_ranking", [None, ReRanking()])
def test_autocast_around_the_call_changes_nothing(re_ranking: ReRanking | None) -> None:
    """Under a caller's bf16 autocast the similarity (and re-ranking distance) matmuls ran
    in bf16, which moved mAP and mINP here (and reorders close gallery items)."""
    qf, ql, gf, gl = random_set(seed=4, num_q=60, num_g=200, dim=64, dtype=torch.float32)
    expected = evaluate_retrieval(qf, ql, gf, gl, re_ranking=re_ranking, **ALL_METRICS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = evaluate_retrieval(qf, ql, gf, gl, re_ranking=re_ranking, **ALL_METRICS)
        distances = k_reciprocal_distances(qf, gf)
    assert got.metrics == expected.metrics
    assert distances.dtype == torch.float32
    assert torch.equal(distances, k_reciprocal_distances(qf, gf))


def test_query_blocks_bound_the_score_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only [block, G] score matrices are ever ranked, never the full [Q, G] one."""
    shapes: list[tuple[int, ...]] = []
    real = retrieval._positive_ranks

    def recording(scores: torch.Tensor, *args):
        shapes.append(tuple(scores.shape))
        return real(scores, *args)

    monkeypatch.setattr(retrieval, "_positive_ranks", recording)
    qf, ql, gf, gl = random_set(seed=5, num_q=50, num_g=80)
    evaluate_retrieval(qf, ql, gf, gl, block_size=3)
    assert max(s[0] for s in shapes) == 3 and {s[1] for s in shapes} == {80}
    assert sum(s[0] for s in shapes) == 50


def test_only_items_that_outrank_a_positive_are_sorted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A query sorts the items scoring at least its lowest positive, not the whole gallery:
    where every positive is ahead of every negative, just its positives."""
    sizes: list[int] = []
    real_sort = torch.sort

    def recording_sort(tensor: torch.Tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real_sort(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", recording_sort)
    gen = torch.Generator().manual_seed(6)
    ql, gl = torch.randint(0, 10, (20,), generator=gen), torch.randint(0, 10, (300,), generator=gen)
    centers = torch.eye(10, 16, dtype=torch.float64)  # classes far apart: positives first
    qf = centers[ql] + 0.05 * torch.randn(20, 16, generator=gen, dtype=torch.float64)
    gf = centers[gl] + 0.05 * torch.randn(300, 16, generator=gen, dtype=torch.float64)
    result = evaluate_retrieval(qf, ql, gf, gl, block_size=7, recall_k=(1,), precision_k=())
    assert result["mAP"] == 1.0
    assert sum(sizes) == int((ql[:, None] == gl[None, :]).sum())


def full_sort_statistics(
    scores: torch.Tensor, ql: torch.Tensor, gl: torch.Tensor, qid=None, gid=None
) -> torch.Tensor:
    """[Q, G] bool: query i's positives in the order of its whole gallery, sorted at once."""
    positive = ql[:, None] == gl[None, :]
    scores = scores.clone()
    if qid is not None:
        same = (qid[:, None] == gid[None, :]) & positive
        scores[same] = float("-inf")
        positive &= ~same
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return positive.gather(1, order)


@pytest.mark.parametrize("block_size", [1, 4, None])
def test_rank_statistics_equal_the_full_sort(block_size: int | None) -> None:
    """Ranks, AP and hits are exactly those of sorting each query's whole gallery, ties and
    excluded ids included."""
    gen = torch.Generator().manual_seed(7)
    qf = torch.randint(0, 2, (30, 16), generator=gen).double() * 2 - 1
    gf = torch.cat([qf[:10], torch.randint(0, 2, (110, 16), generator=gen).double() * 2 - 1])
    gf[60:] = gf[:60]  # exact duplicates: many exact ties
    ql = torch.randint(0, 4, (30,), generator=gen)
    ql[:2] = 9  # no positive
    gl = torch.randint(0, 4, (120,), generator=gen)
    gl[:10] = ql[:10]
    qid, gid = torch.arange(30), torch.arange(120) % 40
    scores = (qf / 4) @ (gf / 4).T  # unit rows
    for ids in [(None, None), (qid, gid)]:
        stats = retrieval._rank_statistics(
            lambda a, b: scores[a:b].clone(), ql, gl, *ids, block_size or 30, (1, 5)
        )
        hit = full_sort_statistics(scores, ql, gl, *ids)
        rank = torch.arange(1, 121, dtype=torch.float64).expand(30, 120)
        count = hit.sum(dim=1)
        ordinal = hit.cumsum(dim=1).double()
        has = count > 0
        first = torch.where(hit, rank, torch.inf).amin(dim=1)
        last = torch.where(hit, rank, 0).amax(dim=1)
        ap = torch.where(hit, ordinal / rank, 0).sum(dim=1) / count.clamp(min=1)
        assert torch.equal(stats.num_positives, count)
        assert torch.equal(stats.first_rank[has], first[has])
        assert torch.equal(stats.last_rank[has], last[has])
        assert torch.allclose(stats.average_precision, ap, rtol=0, atol=1e-15)
        for k, hits in zip((1, 5), stats.hits_at_k, strict=True):
            assert torch.equal(hits, hit[:, :k].sum(dim=1).double())


# --------------------------------------------------------------------------- pytorch-metric-learning


def pml_accuracy(query, query_labels, reference=None, reference_labels=None) -> dict[str, float]:
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision"),
        k=None,  # rank the whole reference set, so its AP is over all positives like ours
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),
    )
    return calculator.get_accuracy(query, query_labels, reference, reference_labels)


@pytest.mark.parametrize("self_retrieval", [False, True])
def test_matches_pytorch_metric_learning(self_retrieval: bool) -> None:
    """What coincides with AccuracyCalculator (k=None, i.e. the whole reference ranked):
    - its `precision_at_1` == our recall@1 == our precision@1;
    - its `mean_average_precision` (sum of precision at each positive's rank over the
      number of positives in the reference) == our mAP.
    Both drop queries whose label has no other reference item, as we do. Its
    `mean_average_precision_at_r` and `r_precision` are different metrics, not compared.
    With `reference=None` it searches the set against itself minus each query's own
    entry, which is our same-id exclusion with ids = row index. Continuous random features:
    no score ties, so its top-k order agrees with our ranking."""
    if self_retrieval:
        feats, labels, _, _ = random_set(seed=6, num_q=80, num_g=1, classes=20, dtype=torch.float32)
        labels[:2] = torch.tensor([50, 51])  # singletons: no positive once self is excluded
        ids = torch.arange(80)
        ours = evaluate_retrieval(
            feats,
            labels,
            feats,
            labels,
            query_ids=ids,
            gallery_ids=ids,
            recall_k=(1,),
            precision_k=(1,),
        )
        theirs = pml_accuracy(feats, labels)
        counts = torch.bincount(labels)[labels]
        assert ours.num_queries_without_positive == int((counts == 1).sum()) >= 2
    else:
        qf, ql, gf, gl = random_set(seed=7, num_q=60, num_g=250, classes=20, dtype=torch.float32)
        ql[:3] = 40
        ours = evaluate_retrieval(qf, ql, gf, gl, recall_k=(1,), precision_k=(1,))
        theirs = pml_accuracy(qf, ql, gf, gl)
        assert ours.num_queries_without_positive == int((~torch.isin(ql, gl)).sum()) >= 3
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["mAP"] == pytest.approx(theirs["mean_average_precision"], abs=1e-5)
    assert 0.1 < ours["mAP"] < 0.95


# --------------------------------------------------------------------------- re-ranking


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (5, 1, 0.0), (7, 3, 1.0)])
def test_rerank_matches_naive_loops(k1: int, k2: int, lam: float) -> None:
    qf, _, gf, _ = random_set(seed=8, num_q=12, num_g=40, classes=5)
    got = k_reciprocal_distances(qf, gf, k1=k1, k2=k2, lambda_value=lam)
    expected = naive_rerank(qf.numpy(), gf.numpy(), k1, k2, lam)
    assert got.shape == (12, 40) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)


def test_rerank_chunked_paths_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunk limits force every row-chunked and pair-chunked loop through many steps."""
    import shitu.evaluation.reranking as reranking

    qf, _, gf, _ = random_set(seed=13, num_q=10, num_g=30, classes=4)
    whole = k_reciprocal_distances(qf, gf, k1=8, k2=4)
    monkeypatch.setattr(reranking, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(reranking, "_PAIRS_PER_STEP", 5)
    chunked = k_reciprocal_distances(qf, gf, k1=8, k2=4)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        chunked.numpy(), naive_rerank(qf.numpy(), gf.numpy(), 8, 4, 0.3), atol=1e-10
    )


def test_rerank_self_distances_are_symmetric() -> None:
    """Against itself with lambda=0 (Jaccard only), the distance is symmetric, 0 on the
    diagonal (an item and its copy have identical neighbour sets) and within [0, 1]."""
    feats, _, _, _ = random_set(seed=9, num_q=30, num_g=1, classes=4, dtype=torch.float32)
    dist = k_reciprocal_distances(feats, feats, k1=6, k2=3, lambda_value=0.0)
    assert dist.shape == (30, 30) and dist.dtype == torch.float32
    torch.testing.assert_close(dist, dist.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(dist.diagonal(), torch.zeros(30), rtol=0, atol=1e-6)
    assert dist.min() >= 0 and dist.max() <= 1 + 1e-6
    mixed = k_reciprocal_distances(feats[:10], feats, k1=6, k2=3, lambda_value=0.3)
    assert mixed.shape == (10, 30) and mixed.min() >= 0 and mixed.max() <= 1 + 1e-6


def test_rerank_many_exact_duplicates_give_no_nan() -> None:
    """Six identical gallery vectors with k1 = 2: the last ones have three copies before
    them in every neighbour list, so no k-reciprocal set holds them (an empty weight row,
    which must stay zero as in the reference code, not become 0/0 = NaN)."""
    qf = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gf = torch.tensor([[1.0, 0.0]] * 6 + [[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    for k2 in (1, 3):
        got = k_reciprocal_distances(qf, gf, k1=2, k2=k2, lambda_value=0.3)
        assert bool(torch.isfinite(got).all())
        expected = naive_rerank(qf.numpy(), gf.numpy(), 2, k2, 0.3)
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    # Far negatives with NaN distances would sort first, above the query's near positive.
    gf = torch.tensor([[0.0, 1.0]] * 6 + [[0.98, 0.2]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 1, 1, 1, 0])
    result = evaluate_retrieval(qf, torch.tensor([0]), gf, labels, re_ranking=ReRanking(k1=2, k2=1))
    assert result["recall@1"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rerank_copies_of_a_gallery_vector_tie(dtype) -> None:
    """Copies of one gallery vector have the same re-ranked distance to every query, so
    they rank in gallery order. The distance matrix's product rounded the copies in its
    edge tiles otherwise in the last bit, so their neighbour lists and distances differed."""
    gen = torch.Generator().manual_seed(3)
    for dim in (64, 512):
        for copies in (7, 37):
            others = torch.randn(20, dim, generator=gen, dtype=dtype)
            copy = torch.randn(1, dim, generator=gen, dtype=dtype).repeat(copies, 1)
            queries = torch.randn(3, dim, generator=gen, dtype=dtype)
            dist = k_reciprocal_distances(queries, torch.cat([others, copy]), k1=5, k2=3)
            of_copies = dist[:, 20:]
            assert torch.equal(of_copies, of_copies[:, :1].expand_as(of_copies)), (dim, copies)


def hub_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A query (label 0) whose single nearest gallery item `nb` (label 1) belongs to a tight
    cluster of five other label-1 items, while three label-0 items are a bit farther away.

    Unit vectors on orthogonal axes e0..e15 (cosine to the query in brackets):
      query q = e0; nb = cos20 e0 + sin20 e1 (0.940); A_i = cos22 e0 + sin22 e(2+i) (0.927);
      B_j = cos15 nb + sin15 e(5+j) (0.908), i < 3, j < 5.
    With k1 = 4: q's 5 nearest are {q, nb, A0..A2}; nb's are nb and four B_j (all closer to
    it than q), so nb is not a reciprocal neighbour of q, but every A_i has q among its 5
    nearest. Plain cosine ranks nb first; re-ranking must put all three A_i first.
    """
    eye = torch.eye(16, dtype=torch.float64)
    c = lambda deg: math.cos(math.radians(deg))  # noqa: E731
    s = lambda deg: math.sin(math.radians(deg))  # noqa: E731
    nb = c(20) * eye[0] + s(20) * eye[1]
    a = [c(22) * eye[0] + s(22) * eye[2 + i] for i in range(3)]
    b = [c(15) * nb + s(15) * eye[5 + j] for j in range(5)]
    gallery = torch.stack([*b[:2], nb, *a, *b[2:]])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1])
    return eye[:1], torch.tensor([0]), gallery, labels


def test_rerank_fixes_a_hub_negative() -> None:
    qf, ql, gf, gl = hub_case()
    plain = evaluate_retrieval(qf, ql, gf, gl, recall_k=(1,), minp=True)
    assert plain["recall@1"] == 0.0 and plain["mAP"] < 1.0
    reranking = ReRanking(k1=4, k2=1, lambda_value=0.3)
    dist = k_reciprocal_distances(qf, gf, 4, 1, 0.3)
    assert dist.shape == (1, 9)
    assert set(dist[0].argsort()[:3].tolist()) == {3, 4, 5}
    rr = evaluate_retrieval(qf, ql, gf, gl, recall_k=(1,), minp=True, re_ranking=reranking)
    assert rr["recall@1"] == 1.0 and rr["mAP"] == 1.0 and rr["mINP"] == 1.0
    # The evaluator ranks by the re-ranked distances: same result through the config API.
    via_config = RetrievalEvaluator.from_metric_config(
        [{"Recallk": {"topk": [1]}}, {"mAP": {}}], re_ranking={"k1": 4, "k2": 1}
    ).evaluate(qf, ql, gf, gl)
    assert via_config["recall@1"] == 1.0


def test_rerank_size_limit() -> None:
    qf, ql, gf, gl = random_set(seed=10, num_q=4, num_g=8)
    with pytest.raises(ReRankingTooLargeError, match=r"12 samples|max_samples=10") as small:
        k_reciprocal_distances(qf, gf, max_samples=10)
    assert "12x12 distance matrix (~0.1 MiB)" in str(small.value)  # not "~0.0 GiB"
    with pytest.raises(ReRankingTooLargeError, match=r"\(~6\.0 GiB\)"):  # 23,170 squared x 12
        check_rerank_size(20_000, 3_170, 10_000)
    evaluator = RetrievalEvaluator(re_ranking=ReRanking(max_samples=11))
    with pytest.raises(ShituError, match="max_samples=11"):
        evaluator.evaluate(qf, ql, gf, gl)
    assert k_reciprocal_distances(qf, gf, max_samples=12).shape == (4, 8)


# --------------------------------------------------------------------------- config API


def test_from_metric_config() -> None:
    evaluator = RetrievalEvaluator.from_metric_config(
        [
            {"Recallk": {"topk": [5, 1]}},
            {"mAP": {}},
            {"mINP": None},
            {"Precisionk": {"topk": 5}},
            {"Recallk": {"topk": [1, 10], "descending": True}},
        ],
        re_ranking=False,
    )
    assert evaluator.metric_names == (
        "recall@1",
        "recall@5",
        "recall@10",
        "precision@5",
        "mAP",
        "mINP",
    )
    assert evaluator.re_ranking is None
    result = evaluator.evaluate(*ranking_case())
    assert tuple(result.metrics) == evaluator.metric_names
    default = RetrievalEvaluator.from_metric_config([], re_ranking=True)
    assert default.metric_names == ("recall@1", "recall@5", "mAP")
    assert default.re_ranking == ReRanking(k1=20, k2=6, lambda_value=0.3)
    custom = RetrievalEvaluator.from_metric_config(None, re_ranking={"k1": 10, "lambda": 0.5})
    assert custom.re_ranking == ReRanking(k1=10, k2=6, lambda_value=0.5)


@pytest.mark.parametrize(
    ("items", "re_ranking", "message"),
    [
        ([{"Recalk": {"topk": [1]}}], False, r"Metric.Eval\[0\].*'Recalk'.*did you mean 'Recallk'"),
        ([{"mAP": {}}, {"map": {}}], False, r"Metric.Eval\[1\].*did you mean 'mAP'"),
        ([{"TopkAcc": {"topk": [1]}}], False, r"unknown retrieval metric 'TopkAcc'"),
        ([{"Recallk": {"top_k": [1]}}], False, r"top_k: unknown parameter \(did you mean 'topk'"),
        ([{"Recallk": {"topk": 0}}], False, "positive integer"),
        ([{"Recallk": {"topk": [1, -5]}}], False, "positive integer"),
        ([{"Precisionk": {"topk": [2.5]}}], False, "positive integer"),
        ([{"Precisionk": {"topk": "5"}}], False, "positive integer"),
        ([{"Recallk": {"topk": True}}], False, "positive integer"),
        ([{"Recallk": {"topk": []}}], False, "must not be empty"),
        ([{"mAP": {"descending": False}}], False, "only true"),
        ([{"mAP": {}, "mINP": {}}], False, "one {name: params} entry"),
        (["mAP"], False, "one {name: params} entry"),
        ([{"mAP": [1]}], False, "mapping of parameters"),
        ([{"mAP": {}}], {"k_1": 2}, r"re_ranking.k_1.*did you mean 'k1'"),
        ([{"mAP": {}}], {"k1": 0}, r"re_ranking.k1: must be a positive integer"),
        ([{"mAP": {}}], {"lambda": 1.5}, r"lambda_value: must be a number in \[0, 1\]"),
        ([{"mAP": {}}], {"lambda": 0.3, "lambda_value": 0.5}, "are one setting; give one"),
        ([{"mAP": {}}], "yes", "expected true/false"),
    ],
)
def test_bad_metric_config(items, re_ranking, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        RetrievalEvaluator.from_metric_config(items, re_ranking=re_ranking)
    assert "\n" not in str(info.value)


def test_evaluator_rejects_bad_fields() -> None:
    with pytest.raises(ConfigError, match="no retrieval metric"):
        RetrievalEvaluator(recall_k=(), map=False)
    with pytest.raises(ConfigError, match="recall_k"):
        RetrievalEvaluator(recall_k=(0,))
    with pytest.raises(ConfigError, match="block_size"):
        RetrievalEvaluator(block_size=0)


# --------------------------------------------------------------------------- input checks


def test_input_validation() -> None:
    qf, ql, gf, gl = random_set(seed=11, num_q=5, num_g=9)
    cases = [
        ((qf, ql, gf[:, :8], gl), {}, "dimension 16 but gallery features have 8"),
        ((qf, ql[:4], gf, gl), {}, "query_labels has 4 entries but the features have 5"),
        ((qf, ql, gf, gl[:3]), {}, "gallery_labels has 3 entries"),
        ((qf[:0], ql[:0], gf, gl), {}, "query_features is empty"),
        ((qf, ql, gf[:0], gl[:0]), {}, "gallery_features is empty"),
        ((qf[0], ql, gf, gl), {}, "2-D"),
        ((qf, ql.float(), gf, gl), {}, "integer tensor"),
        ((qf.long(), ql, gf, gl), {}, "floating-point"),
        ((qf, ql, gf.numpy(), gl), {}, "must be a torch.Tensor"),
        ((qf, ql, gf, gl), {"query_ids": torch.arange(5)}, "given together"),
        (
            (qf, ql, gf, gl),
            {"query_ids": torch.arange(4), "gallery_ids": torch.arange(9)},
            "query_ids has 4",
        ),
    ]
    nan = qf.clone()
    nan[0, 0] = float("nan")
    cases.append(((nan, ql, gf, gl), {}, "NaN"))
    for args, kwargs, message in cases:
        with pytest.raises(EvaluationInputError, match=message):
            evaluate_retrieval(*args, **kwargs)
    assert issubclass(EvaluationInputError, ShituError)
    assert issubclass(EvaluationInputError, ValueError)
    with pytest.raises(EvaluationInputError, match="none of the 5 queries has a positive"):
        evaluate_retrieval(qf, ql + 100, gf, gl)


def test_rerank_refuses_features_that_evaluation_refuses() -> None:
    """Called on its own, re-ranking gave NaN distances for a NaN feature, ranked integer
    features, and failed inside torch.cat on two dimensions."""
    qf, _, gf, _ = random_set(seed=11, num_q=5, num_g=9)
    nan = gf.clone()
    nan[3, 0] = float("nan")
    for query, gallery, message in [
        (qf, gf[:, :8], "query features have dimension 16 but gallery features have 8"),
        (qf, nan, "gallery_features contains NaN or infinite values"),
        (qf.long(), gf, "query_features must be a floating-point tensor, got torch.int64"),
        (qf, gf[:0], r"gallery_features is empty \(shape \(0, 16\)\)"),
    ]:
        with pytest.raises(EvaluationInputError, match=f"^{message}$"):
            k_reciprocal_distances(query, gallery)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    qf, ql, gf, gl = random_set(seed=12, num_q=40, num_g=120, dtype=torch.float32)
    ids = (torch.arange(40), torch.arange(120) % 50)
    cpu = evaluate_retrieval(qf, ql, gf, gl, query_ids=ids[0], gallery_ids=ids[1], **ALL_METRICS)
    gpu = evaluate_retrieval(
        qf.cuda(),
        ql.cuda(),
        gf.cuda(),
        gl.cuda(),
        query_ids=ids[0].cuda(),
        gallery_ids=ids[1].cuda(),
        block_size=7,
        **ALL_METRICS,
    )
    for key, value in cpu.metrics.items():
        assert gpu[key] == pytest.approx(value, abs=1e-5), key
    rr = ReRanking(k1=6, k2=3)
    torch.testing.assert_close(
        k_reciprocal_distances(qf.cuda(), gf.cuda(), 6, 3).cpu(),
        k_reciprocal_distances(qf, gf, 6, 3),
        rtol=0,
        atol=1e-5,
    )
    on_gpu = evaluate_retrieval(qf.cuda(), ql.cuda(), gf.cuda(), gl.cuda(), re_ranking=rr)
    on_cpu = evaluate_retrieval(qf, ql, gf, gl, re_ranking=rr)
    for key, value in on_cpu.metrics.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-5), key
