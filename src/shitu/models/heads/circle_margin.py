"""Circle loss logits (Sun et al., https://arxiv.org/abs/2002.10857), class-level form."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from shitu.models.heads.cosine import CosineClassifier, Scale
from shitu.registry import HEADS, Size

# The relaxation m sets the optima (1 + m for the true class, -m for the others) and the
# thresholds (1 - m and m). Below 0 the true class's weight alpha_p is 0 short of cos 1,
# which its threshold 1 - m lies beyond; from 0.5 on the true class's threshold is at or
# below the others', so a feature nearer another class than its own already counts as
# classified (the decision boundary, a circle of radius sqrt(2)*m round cos 1, reaches
# across the diagonal).
CircleRelaxation = Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)]


@HEADS.register("CircleMargin")
class CircleMargin(CosineClassifier):
    """Re-weights each similarity by its distance from its optimum.

    True class: s * alpha_p * (cos - (1 - m)), alpha_p = max(0, 1 + m - cos);
    other classes: s * alpha_n * (cos - m), alpha_n = max(0, cos + m).
    The weights alpha are treated as constants (no gradient), as in the paper.
    """

    def __init__(
        self, embedding_size: Size, class_num: Size, margin: CircleRelaxation, scale: Scale
    ) -> None:
        super().__init__(embedding_size, class_num)
        self.margin = margin
        self.scale = scale

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x)
        if not self.training or label is None:
            return cos
        alpha_p = (1.0 + self.margin - cos.detach()).clamp(min=0.0)
        alpha_n = (cos.detach() + self.margin).clamp(min=0.0)
        positive = alpha_p * (cos - (1.0 - self.margin))
        negative = alpha_n * (cos - self.margin)
        one_hot = self.one_hot(label, cos)
        return self.scale * (one_hot * positive + (1.0 - one_hot) * negative)
