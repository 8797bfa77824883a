"""Batch-hard triplet loss in cosine space with absolute constraints (PP-ShiTuV2's metric loss)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from shitu.registry import LOSSES


@LOSSES.register("TripletAngularMarginLoss")
class TripletAngularMarginLoss(nn.Module):
    """For each anchor: hardest positive (lowest cosine) vs hardest negative (highest cosine).

    ranking = relu(s_an - s_ap + margin); with `add_absolute`, also pull every hardest
    positive above `ap_value` and push every hardest negative below `an_value`:
    absolute_loss_weight * (mean relu(ap_value - s_ap) + mean relu(s_an - an_value)).
    The absolute terms keep similarities meaningful as thresholds at search time.
    Anchors without a positive or a negative in the batch are left out.
    """

    input_key: ClassVar[str] = "features"

    def __init__(
        self,
        margin: float = 0.5,
        normalize_feature: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
        add_absolute: bool = True,
        absolute_loss_weight: float = 0.1,
        ap_value: float = 0.8,
        an_value: float = 0.4,
    ) -> None:
        super().__init__()
        self.margin = margin
        self.normalize_feature = normalize_feature
        self.reduction = reduction
        self.add_absolute = add_absolute
        self.absolute_loss_weight = absolute_loss_weight
        self.ap_value = ap_value
        self.an_value = an_value

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.normalize_feature:
            inputs = F.normalize(inputs, dim=1)
        labels = labels.reshape(-1)
        similarity = inputs @ inputs.t()
        same = labels[:, None] == labels[None, :]
        # The self-pair (similarity 1) never decides the hardest positive.
        positives = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        negatives = ~same
        valid = positives.any(dim=1) & negatives.any(dim=1)
        if not valid.any():
            return inputs.sum() * 0.0
        s_ap = similarity.masked_fill(~positives, float("inf")).min(dim=1).values[valid]
        s_an = similarity.masked_fill(~negatives, float("-inf")).max(dim=1).values[valid]
        reduce = torch.mean if self.reduction == "mean" else torch.sum
        loss = reduce(F.relu(s_an - s_ap + self.margin))
        if self.add_absolute:
            absolute = reduce(F.relu(self.ap_value - s_ap)) + reduce(F.relu(s_an - self.an_value))
            loss = loss + self.absolute_loss_weight * absolute
        return loss
