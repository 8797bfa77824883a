"""k-reciprocal re-ranking (Zhong et al., CVPR 2017, "Re-ranking Person Re-identification
with k-reciprocal Encoding").

Two images are likely the same object when each is among the other's nearest neighbours,
so the re-ranked distance mixes the plain distance with a Jaccard distance between the
images' (expanded) k-reciprocal neighbour sets. The method needs every pairwise distance
among queries *and* gallery, i.e. a dense (Q+G) x (Q+G) matrix, so it suits small and medium
evaluation sets only; `max_samples` turns an oversized request into a clear error instead of
an out-of-memory crash.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shitu.errors import ConfigError, ShituError
from shitu.values import is_number, is_whole_number

# About 12 bytes per entry of the (Q+G)^2 matrix are alive at the peak (see
# `k_reciprocal_distances`): 8000 samples -> ~0.77 GB.
DEFAULT_MAX_SAMPLES = 8000
# Rows per chunk for the row-wise sorts / gathers, so their temporaries stay near this many bytes.
_CHUNK_BYTES = 64 * 2**20
# Query/gallery entry pairs accumulated per step of the sparse Jaccard sum.
_PAIRS_PER_STEP = 2**22


class ReRankingTooLargeError(ShituError, ValueError):
    """The query + gallery set is above the re-ranking size limit."""


@dataclass(frozen=True)
class ReRanking:
    """Settings of k-reciprocal re-ranking; the defaults are the paper's (20, 6, 0.3).

    k1: size of the k-reciprocal neighbourhood; k2: neighbours averaged in the local query
    expansion (1 = none); lambda_value: weight of the original distance in the final mix
    (0 = Jaccard distance only); max_samples: refuse Q + G above this (memory ~ 12 (Q+G)^2 bytes).
    """

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    max_samples: int = DEFAULT_MAX_SAMPLES

    def __post_init__(self) -> None:
        for name in ("k1", "k2", "max_samples"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise ConfigError(
                    f"Global.re_ranking.{name}: must be a positive integer, got {value!r}"
                )
            object.__setattr__(self, name, int(value))
        lam = self.lambda_value
        if not is_number(lam) or not 0.0 <= lam <= 1.0:
            raise ConfigError(
                f"Global.re_ranking.lambda_value: must be a number in [0, 1], got {lam!r}"
            )
        object.__setattr__(self, "lambda_value", float(lam))


def check_rerank_size(n_query: int, n_gallery: int, max_samples: int) -> None:
    """ReRankingTooLargeError unless re-ranking these sets fits in `max_samples`; checked
    before any embedding work too, so a run fails at its start, not after an epoch."""
    total = n_query + n_gallery
    if total > max_samples:
        mib = 12 * total * total / 2**20  # a limit lowered to a small set: not "0.0 GiB"
        size = f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{max(mib, 0.1):.1f} MiB"
        raise ReRankingTooLargeError(
            f"k-reciprocal re-ranking needs a dense {total}x{total} distance matrix "
            f"(~{size}) for {n_query} queries + {n_gallery} "
            f"gallery items, above its limit of max_samples={max_samples}; raise the limit "
            "(Global.re_ranking: {max_samples: N}) or evaluate without re-ranking"
        )


def k_reciprocal_distances(
    query_features: Tensor,
    gallery_features: Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> Tensor:
    """Re-ranked query-to-gallery distances, shape [Q, G]; lower means more similar.

    Features are L2-normalised; the base distance is the squared Euclidean distance of unit
    vectors (2 - 2 cos), divided by each row's maximum as in the paper's reference code, so the
    result lies in [0, 1]. Neighbour-rank ties are broken by sample index (queries first).
    Computes in float64 when a feature tensor is float64, else float32, on the query device.

    Peak memory is about 12 (Q+G)^2 bytes in float32 (two dense (Q+G)^2 float matrices, one
    bool mask, the [Q, G] output and chunked temporaries), hence `max_samples`.
    """
    from shitu.evaluation.retrieval import check_features  # (that module imports this one)

    # else NaN distances, or a size mismatch failing inside torch.cat
    query_features, gallery_features = check_features(query_features, gallery_features)
    n_query, n_gallery = len(query_features), len(gallery_features)
    check_rerank_size(n_query, n_gallery, max_samples)
    total = n_query + n_gallery
    device = query_features.device
    dtype = (
        torch.float64
        if torch.float64 in (query_features.dtype, gallery_features.dtype)
        else torch.float32
    )
    feats = torch.cat([query_features.to(device, dtype), gallery_features.to(device, dtype)])
    feats = F.normalize(feats, dim=1)
    # In `dtype` also when called under autocast, whose bf16 matmul would round the distances.
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        # Copies of one vector are compared once, so that they tie exactly (see
        # `distinct_rows`), and the rest exactly symmetric: neighbour ranks do not depend on
        # the GEMM's summation order.
        distinct, copies = distinct_rows(feats)
        dist = (2.0 - 2.0 * (distinct @ distinct.T)).clamp_(min=0.0)
        dist = (dist + dist.T) / 2.0
        if copies is not None:
            dist = dist[copies[:, None], copies]  # one gather: no copies x distinct matrix
        dist /= dist.amax(dim=1, keepdim=True).clamp_(min=torch.finfo(dtype).tiny)

        k_full = min(k1 + 1, total)
        k_half = min(round(k1 / 2) + 1, total)  # round half to even, like the reference code
        k_qe = min(k2, total)
        rank = _nearest(dist, max(k_full, k_qe))

        members = _expanded_reciprocal_sets(rank, k_full, k_half)
        base = dist[:n_query, n_query:].clone()
        weights = dist.neg_().exp_().mul_(members)  # reuses the distance matrix's memory
        del dist, members
        # A sample with more than k1 exact duplicates before it (by index) is in none of its
        # k-reciprocal sets: its row stays empty, all zeros as in the reference code, not 0/0.
        weights /= weights.sum(dim=1, keepdim=True).clamp_(min=torch.finfo(dtype).tiny)
        if k_qe > 1:
            weights = _query_expansion(weights, rank[:, :k_qe])
        # Rows of `weights` sum to 1, so the overlap is at most 1 up to rounding.
        overlap = _min_overlap(weights[:n_query], weights[n_query:]).clamp_(max=1.0)
        del weights
        jaccard = 1.0 - overlap / (2.0 - overlap)
        return jaccard * (1.0 - lambda_value) + base * lambda_value


def distinct_rows(matrix: Tensor) -> tuple[Tensor, Tensor | None]:
    """The distinct rows of `matrix` and, for each row, its index among them; `matrix`
    itself and None where no two rows are equal. A matrix product rounds the columns of its
    edge tiles otherwise than the rest in the last bit, so the scores of copies of one
    vector (a photo listed twice) tie exactly only where the copies are scored once."""
    distinct, inverse = torch.unique(matrix, dim=0, return_inverse=True)
    if len(distinct) == len(matrix):
        return matrix, None
    return distinct, inverse


def _nearest(dist: Tensor, k: int) -> Tensor:
    """Indices of each row's k smallest distances, ties by index (chunked stable sort)."""
    n = len(dist)
    chunk = max(1, _CHUNK_BYTES // (12 * n))
    out = torch.empty((n, k), dtype=torch.long, device=dist.device)
    for start in range(0, n, chunk):
        block = dist[start : start + chunk]
        out[start : start + chunk] = torch.sort(block, dim=1, stable=True).indices[:, :k]
    return out


def _reciprocal(rank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each sample's k nearest (itself included) and which of them have it in their k nearest."""
    forward = rank[:, :k]
    own = torch.arange(len(rank), device=rank.device)[:, None, None]
    is_mutual = (rank[forward, :k] == own).any(dim=-1)
    return forward, is_mutual


def _expanded_reciprocal_sets(rank: Tensor, k_full: int, k_half: int) -> Tensor:
    """[N, N] bool: the k-reciprocal set R(i, k1) plus every R(c, k1/2), c in R(i, k1), that
    shares more than 2/3 of its members with R(i, k1) (the paper's set expansion)."""
    n = len(rank)
    fwd, mutual = _reciprocal(rank, k_full)
    half_fwd, half_mutual = _reciprocal(rank, k_half)
    members = torch.zeros((n, n), dtype=torch.bool, device=rank.device)
    rows = torch.arange(n, device=rank.device)
    members[rows[:, None].expand_as(fwd)[mutual], fwd[mutual]] = True
    chunk = max(1, _CHUNK_BYTES // (k_full * k_half * k_full))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        f, m = fwd[start:stop], mutual[start:stop]
        cand, cand_ok = half_fwd[f], half_mutual[f]  # [b, k_full, k_half]: candidates' half sets
        # Whether each candidate-set member is in R(i, k1), i.e. equals a mutual forward entry.
        shared = ((cand[..., None] == f[:, None, None, :]) & m[:, None, None, :]).any(dim=-1)
        shared &= cand_ok
        accept = m & (3 * shared.sum(dim=-1) > 2 * cand_ok.sum(dim=-1))
        take = accept[..., None] & cand_ok
        block_rows = rows[start:stop, None, None].expand_as(cand)
        members[block_rows[take], cand[take]] = True
    return members


def _query_expansion(weights: Tensor, neighbours: Tensor) -> Tensor:
    """Replace each row by the mean of its k2 nearest samples' rows (local query expansion)."""
    n, k = neighbours.shape
    out = torch.empty_like(weights)
    chunk = max(1, _CHUNK_BYTES // (k * n * weights.element_size()))
    for start in range(0, n, chunk):
        out[start : start + chunk] = weights[neighbours[start : start + chunk]].mean(dim=1)
    return out


def _min_overlap(query_weights: Tensor, gallery_weights: Tensor) -> Tensor:
    """[Q, G] sums over samples j of min(Vq[i, j], Vg[g, j]), the fuzzy set intersection.

    The weight rows are sparse (a few dozen non-zeros), so instead of Q*G*N dense work this
    joins the non-zeros of both sides on their column j (the paper's inverted index).
    """
    n_query, n_gallery = len(query_weights), len(gallery_weights)
    device = query_weights.device
    g_col, g_row = gallery_weights.T.nonzero(as_tuple=True)  # sorted by column, then row
    g_val = gallery_weights[g_row, g_col]
    col_count = torch.bincount(g_col, minlength=gallery_weights.shape[1])
    col_start = col_count.cumsum(0) - col_count
    q_row, q_col = query_weights.nonzero(as_tuple=True)
    q_val = query_weights[q_row, q_col]
    pairs_per_entry = col_count[q_col]
    out = torch.zeros(n_query * n_gallery, dtype=query_weights.dtype, device=device)
    cum_pairs = pairs_per_entry.cumsum(0)
    start = 0
    while start < len(q_row):
        done = int(cum_pairs[start - 1]) if start else 0
        stop = int(torch.searchsorted(cum_pairs, done + _PAIRS_PER_STEP, right=True))
        stop = max(stop, start + 1)
        counts = pairs_per_entry[start:stop]
        entry = torch.repeat_interleave(torch.arange(start, stop, device=device), counts)
        first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        offset = torch.arange(len(entry), device=device) - first
        g_idx = col_start[q_col[entry]] + offset
        contrib = torch.minimum(q_val[entry], g_val[g_idx])
        out.index_add_(0, q_row[entry] * n_gallery + g_row[g_idx], contrib)
        start = stop
    return out.view(n_query, n_gallery)
