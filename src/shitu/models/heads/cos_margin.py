"""CosFace additive cosine margin (Wang et al., https://arxiv.org/abs/1801.09414)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import Field

from shitu.models.heads.cosine import CosineClassifier, Scale
from shitu.registry import HEADS, Size

# Cosines lie in [-1, 1]: at a margin of -2 or below every true-class logit is above every
# other whatever the features, so nothing is learnt. Negative margins above it are a
# published use (negative-margin softmax, Liu et al., ECCV 2020); the upper bound depends
# on the class count (`CosMargin.check_params`).
CosineMargin = Annotated[float, Field(gt=-2, allow_inf_nan=False)]


def largest_cosine_margin(class_num: int) -> float:
    """The margin from which some class can never win, for any feature or weights.

    Of class_num unit weight vectors some two have a cosine of at least -1/(class_num - 1)
    (|sum W|^2 >= 0), so they are at most sqrt(2 * class_num / (class_num - 1)) apart; a
    feature's cosines to them differ by no more, so from a margin that large on the first
    class never scores above the second (2 for two classes, about 1.41 for many)."""
    if class_num < 2:
        return 2.0  # cosines lie in [-1, 1]
    return math.sqrt(2 * class_num / (class_num - 1))


@HEADS.register("CosMargin")
class CosMargin(CosineClassifier):
    """Logits s*(cos - m) for the true class and s*cos for the others."""

    def __init__(
        self,
        embedding_size: Size,
        class_num: Size,
        margin: CosineMargin = 0.35,
        scale: Scale = 64.0,
    ) -> None:
        super().__init__(embedding_size, class_num)
        self.check_params(class_num=class_num, margin=margin)
        self.margin = margin
        self.scale = scale

    @staticmethod
    def check_params(class_num: int, margin: float = 0.35, **_others: Any) -> None:
        """Also checked as a config loads (by the registry), naming the file and key."""
        largest = largest_cosine_margin(class_num)
        if margin >= largest:
            raise ValueError(
                f"margin: must be above -2 and below {largest:.4g} (sqrt(2 * class_num / "
                f"(class_num - 1)) for {class_num} classes), got {margin}: from there on some "
                "class never scores above another, whatever the features"
            )

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x)
        if not self.training or label is None:
            return cos
        return self.scale * (cos - self.margin * self.one_hot(label, cos))
