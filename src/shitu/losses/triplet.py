"""Batch-hard triplet loss on Euclidean distances (Hermans et al., 2017)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from shitu.losses._pairs import PairLoss, euclidean_distances, hardest
from shitu.registry import LOSSES, NonNegative


@LOSSES.register("TripletLoss")
class TripletLoss(PairLoss):
    """mean over anchors of relu(d(a, hardest p) - d(a, hardest n) + margin).

    The hardest positive is the farthest same-label embedding (never the anchor
    itself), the hardest negative the nearest other-label one. Anchors lacking a
    positive or a negative are left out of the mean (PaddleClas would use the anchor
    as its own positive); a batch with no usable anchor gives a zero loss.
    `normalize_feature` L2-normalises first, as PaddleClas's TripletLossV2 does.
    """

    def __init__(self, margin: NonNegative = 1.0, normalize_feature: bool = False) -> None:
        super().__init__()
        self.check_params(margin, normalize_feature)
        self.margin = margin
        self.normalize_feature = normalize_feature

    @staticmethod
    def check_params(margin: float = 1.0, normalize_feature: bool = False, **_others: Any) -> None:
        """Also checked as a config loads (by the registry). Unit vectors are at most 2
        apart: from a margin of 2 on it is never met, so every anchor counts however well
        its classes are apart (a loss without the hinge)."""
        if normalize_feature and margin >= 2:
            raise ValueError(
                f"margin: {margin} is never met (normalised features are at most 2 apart); "
                "give one below 2"
            )

    def compare(self, query: Tensor, ref: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not bool(valid.any()):
            return self.without_triplets(query, negative)
        dist = euclidean_distances(query[valid], ref)
        d_ap = hardest(dist, positive[valid], largest=True)
        d_an = hardest(dist, negative[valid], largest=False)
        return F.relu(d_ap - d_an + self.margin).mean()


# PaddleClas's name for the same loss on L2-normalised features, with its defaults: a
# config brought from PaddleClas keeps its margin and normalisation, which `TripletLoss`'s
# defaults (PaddleClas's TripletLoss) would silently change.
LOSSES.register_variant("TripletLossV2", TripletLoss, {}, margin=0.5, normalize_feature=True)
