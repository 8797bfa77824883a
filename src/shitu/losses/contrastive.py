"""Contrastive loss on cosine similarity, the pair loss XBM (Wang et al., CVPR 2020) uses."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor

from shitu.errors import ConfigError
from shitu.losses._pairs import PairLoss
from shitu.registry import LOSSES, Size

# How near a similarity of 1 a positive pair counts as met (skipped). From 1 on, every
# positive pair at a similarity of 0 or more would be, and the loss would hardly pull a
# class together; below 0, not even an anchor's own copy in XBM's memory (similarity 1) is.
Tolerance = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


@LOSSES.register("ContrastiveLoss")
class ContrastiveLoss(PairLoss):
    """(sum over positive pairs of (1 - s) + sum over negative pairs with s > margin of s) / N.

    s is the cosine similarity of a (query, reference) pair and N the number of
    queries. Positive pairs with s >= 1 - epsilon are skipped: they are already
    satisfied, and this drops the exact copies of the batch that a memory may hold.
    Negatives below `margin` are "easy" and contribute nothing; above it they count
    with s itself (not s - margin), as in the XBM authors' and PaddleClas's code.
    Without a reference the batch is compared with itself, minus self-pairs (PaddleClas
    drops them only by the epsilon test, which differs with `normalize_feature` false,
    where a self-pair's s = |x|^2 need not be near 1).
    `embedding_size` (PaddleClas's required argument; `feat_dim` in its older
    versions, accepted too) is optional and only checked.
    """

    def __init__(
        self,
        margin: float = 0.5,
        normalize_feature: bool = True,
        epsilon: Tolerance = 1e-5,
        embedding_size: Size | None = None,
        feat_dim: Size | None = None,
    ) -> None:
        super().__init__()
        self.check_params(margin, normalize_feature, embedding_size, feat_dim)
        self.margin = margin
        self.normalize_feature = normalize_feature
        self.epsilon = epsilon
        self.embedding_size = embedding_size if embedding_size is not None else feat_dim

    @staticmethod
    def check_params(
        margin: float = 0.5,
        normalize_feature: bool = True,
        embedding_size: int | None = None,
        feat_dim: int | None = None,
        **_others: Any,
    ) -> None:
        """Also checked as a config loads (by the registry). A cosine similarity never
        exceeds 1, so from a margin of 1 on no negative pair would count, and the loss
        would only pull embeddings together: every image ends up at one point."""
        if normalize_feature and margin >= 1.0:
            raise ValueError(
                f"margin: {margin} leaves out every negative pair (cosines are at most 1), "
                "so the loss would only pull embeddings together; give one below 1"
            )
        if None not in (embedding_size, feat_dim) and embedding_size != feat_dim:
            raise ValueError(
                f"feat_dim: {feat_dim} differs from embedding_size {embedding_size} (two names "
                "of one setting)"
            )

    def check_input(self, embeddings: Tensor) -> None:
        """A ConfigError where `embedding_size` is given and [N, D] `embeddings` differ."""
        if self.embedding_size is not None and embeddings.shape[1] != self.embedding_size:
            raise ConfigError(
                f"ContrastiveLoss.embedding_size is {self.embedding_size} but embeddings have "
                f"{embeddings.shape[1]} dimensions; set embedding_size: {embeddings.shape[1]}, "
                "or leave it out (it is only checked)"
            )

    def compare(self, query: Tensor, ref: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        self.check_input(query)
        sim = query @ ref.t()
        positive = positive & (sim < 1.0 - self.epsilon)
        negative = negative & (sim > self.margin)
        zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
        total = (
            torch.where(positive, 1.0 - sim, zero).sum() + torch.where(negative, sim, zero).sum()
        )
        return total / query.shape[0]
