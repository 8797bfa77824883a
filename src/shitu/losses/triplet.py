"""Batch-hard triplet loss on Euclidean distances (Hermans et al., 2017)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shitu.losses._pairs import (
    euclidean_distances,
    hardest,
    label_masks,
    maybe_normalize,
    resolve_reference,
    zero_loss,
)
from shitu.registry import LOSSES


@LOSSES.register("TripletLoss")
class TripletLoss(nn.Module):
    """mean over anchors of relu(d(a, hardest p) - d(a, hardest n) + margin).

    The hardest positive is the farthest same-label embedding (never the anchor
    itself), the hardest negative the nearest other-label one. Anchors lacking a
    positive or a negative are left out of the mean (PaddleClas would use the anchor
    as its own positive); a batch with no usable anchor gives a zero loss.
    `normalize_feature` L2-normalises first, as PaddleClas's TripletLossV2 does.
    """

    input_key: ClassVar[str] = "features"
    supports_reference: ClassVar[bool] = True

    def __init__(self, margin: float = 1.0, normalize_feature: bool = False) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.normalize_feature = normalize_feature

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        ref_inputs: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        labels, ref_inputs, ref_labels, is_self = resolve_reference(
            inputs, labels, ref_inputs, ref_labels
        )
        query = maybe_normalize(inputs, self.normalize_feature)
        ref = query if is_self else maybe_normalize(ref_inputs, self.normalize_feature)
        positive, negative = label_masks(labels, ref_labels, is_self)
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not bool(valid.any()):
            return zero_loss(inputs)
        dist = euclidean_distances(query[valid], ref)
        d_ap = hardest(dist, positive[valid], largest=True)
        d_an = hardest(dist, negative[valid], largest=False)
        return F.relu(d_ap - d_an + self.margin).mean()
