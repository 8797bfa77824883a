"""ArcFace additive angular margin (Deng et al., https://arxiv.org/abs/1801.07698)."""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import Field

from shitu.models.heads.cosine import CosineClassifier, Scale
from shitu.registry import HEADS, Size

# An angle added to the true class's: below 0 the logit is no longer monotonic in the angle
# (cos(theta + m) peaks at theta = -m); the upper bound is `LARGEST_ANGULAR_MARGIN`.
AngularMargin = Annotated[float, Field(ge=0, allow_inf_nan=False)]

# The root in (pi/2, pi) of cos m + m*sin m = 1. Past theta = pi - m the logit drops from
# cos(pi) = -1 to cos(theta) - m*sin m, which starts at -(cos m + m*sin m): at or below -1,
# keeping the logit decreasing in the angle, only for margins below this one.
LARGEST_ANGULAR_MARGIN = 2.331122370414423


@HEADS.register("ArcMargin")
class ArcMargin(CosineClassifier):
    """Logits s*cos(theta + m) for the true class and s*cos(theta) for the others.

    Where theta + m would pass pi (cos <= -cos m), the logit becomes cos - m*sin m
    instead, keeping it monotonic (for margins below `LARGEST_ANGULAR_MARGIN`, about 2.33,
    the bound a config is held to); `easy_margin` applies the margin only where cos > 0.
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
        self.check_params(margin=margin)
        self.margin = margin
        self.scale = scale
        self.easy_margin = easy_margin

    @staticmethod
    def check_params(margin: float = 0.5, **_others: Any) -> None:
        """Also checked as a config loads (by the registry), naming the file and key."""
        if margin >= LARGEST_ANGULAR_MARGIN:
            raise ValueError(
                f"margin: must be below {LARGEST_ANGULAR_MARGIN:.4g} radians, got {margin}: "
                "from there on a feature just past the angle pi - margin from its class "
                "scores it higher than one just before, the logit no longer falling as the "
                "angle grows"
            )

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
