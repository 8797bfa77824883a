"""PP-ShiTuV2's triplet loss on cosine similarity, with optional absolute thresholds."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor

from shitu.losses._pairs import PairLoss, hardest
from shitu.registry import LOSSES, NonNegative


@LOSSES.register("TripletAngularMarginLoss")
class TripletAngularMarginLoss(PairLoss):
    """Batch-hard triplet loss in similarity space, which PP-ShiTuV2 trains with.

    For each anchor, s_ap = the lowest cosine similarity to a same-label embedding
    and s_an = the highest to an other-label one. The ranking part is
    relu(s_an - s_ap + margin), averaged (`reduction="mean"`) or summed over anchors.
    With `add_absolute`, absolute_loss_weight * (mean relu(ap_value - s_ap) +
    mean relu(s_an - an_value)) is added, pulling positives above `ap_value` and
    pushing negatives below `an_value` instead of only ranking them: thresholds
    transfer to retrieval, where one similarity cut-off serves every query.

    Differences from PaddleClas (defaults are PaddleClas's; PP-ShiTuV2's config sets
    margin 0.5, add_absolute true, absolute_loss_weight 0.1, ap_value 0.8, an_value 0.4):
    * an anchor is never its own positive, and anchors without a positive or a
      negative are left out (PaddleClas counts the self-pair, s = 1, and needs every
      label to occur equally often in the batch, as a PK sampler guarantees; on such
      batches with K >= 2 both agree);
    * PaddleClas's negative absolute term is 1, not 0, where s_an <= an_value (a
      constant, so gradients agree); here it is the hinge the formula describes, so
      the logged value is lower by absolute_loss_weight * (fraction of such anchors).
    """

    def __init__(
        self,
        margin: NonNegative = 0.5,
        normalize_feature: bool = True,
        reduction: Literal["mean", "sum"] = "mean",
        add_absolute: bool = False,
        absolute_loss_weight: NonNegative = 1.0,
        ap_value: float = 0.9,
        an_value: float = 0.5,
    ) -> None:
        super().__init__()
        self.check_params(margin, normalize_feature, add_absolute, ap_value, an_value)
        self.margin = margin
        self.normalize_feature = normalize_feature
        self.reduction = reduction
        self.add_absolute = add_absolute
        self.absolute_loss_weight = absolute_loss_weight
        self.ap_value = ap_value
        self.an_value = an_value

    @staticmethod
    def check_params(
        margin: float = 0.5,
        normalize_feature: bool = True,
        add_absolute: bool = False,
        ap_value: float = 0.9,
        an_value: float = 0.5,
        **_others: Any,
    ) -> None:
        """Also checked as a config loads (by the registry). Cosine similarities lie in
        [-1, 1]: a margin of 2 or more, or a threshold beyond that range, is never met, so
        every anchor counts however well its classes are apart (a loss without the hinge)."""
        if not normalize_feature:
            return  # dot products of unnormalised features have no bound
        if margin >= 2:
            raise ValueError(
                f"margin: {margin} is never met (cosine similarities differ by at most 2); "
                "give one below 2"
            )
        if add_absolute and ap_value > 1:
            raise ValueError(f"ap_value: {ap_value} is never met (cosines are at most 1)")
        if add_absolute and an_value < -1:
            raise ValueError(f"an_value: {an_value} is never met (cosines are at least -1)")

    def compare(self, query: Tensor, ref: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        valid = positive.any(dim=1) & negative.any(dim=1)
        if not bool(valid.any()):
            return self.without_triplets(query, negative)
        sim = query[valid] @ ref.t()
        s_ap = hardest(sim, positive[valid], largest=False)
        s_an = hardest(sim, negative[valid], largest=True)
        ranking = F.relu(s_an - s_ap + self.margin)
        loss = ranking.mean() if self.reduction == "mean" else ranking.sum()
        if self.add_absolute:
            absolute = F.relu(self.ap_value - s_ap).mean() + F.relu(s_an - self.an_value).mean()
            loss = loss + self.absolute_loss_weight * absolute
        return loss
