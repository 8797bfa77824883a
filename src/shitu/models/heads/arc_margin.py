"""ArcFace additive angular margin (Deng et al., https://arxiv.org/abs/1801.07698)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from shitu.models.heads.cosine import CosineClassifier, Scale
from shitu.registry import HEADS, Size

# An angle added to the true class's: below 0 the logit is no longer monotonic in the angle
# (cos(theta + m) peaks at theta = -m), and from pi on it wraps round.
AngularMargin = Annotated[float, Field(ge=0, lt=math.pi)]


@HEADS.register("ArcMargin")
class ArcMargin(CosineClassifier):
    """Logits s*cos(theta + m) for the true class and s*cos(theta) for the others.

    Where theta + m would pass pi (cos <= -cos m), the logit becomes cos - m*sin m
    instead, keeping it monotonic; `easy_margin` applies the margin only where cos > 0.
    sin is taken of 1 - cos^2 clamped at 0: rounding can put the cosine of a feature equal
    to its class weight a little above 1, whose square root would be NaN.
    """

    def __init__(
        self,
        embedding_size: Size,
        class_num: Size,
        margin: AngularMargin = 0.5,
        scale: Scale = 80.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(embedding_size, class_num)
        self.margin = margin
        self.scale = scale
        self.easy_margin = easy_margin

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x)
        if not self.training or label is None:
            return cos
        sin = torch.sqrt((1.0 - cos.square()).clamp(min=0.0) + 1e-6)
        phi = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            threshold = -math.cos(self.margin)
            phi = torch.where(cos > threshold, phi, cos - math.sin(self.margin) * self.margin)
        one_hot = self.one_hot(label, cos)
        return self.scale * (one_hot * phi + (1.0 - one_hot) * cos)
