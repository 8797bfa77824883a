"""CosFace additive cosine margin (Wang et al., https://arxiv.org/abs/1801.09414)."""

from __future__ import annotations

import torch

from shitu.models.heads.cosine import CosineClassifier, Scale
from shitu.registry import HEADS, Size


@HEADS.register("CosMargin")
class CosMargin(CosineClassifier):
    """Logits s*(cos - m) for the true class and s*cos for the others."""

    def __init__(
        self, embedding_size: Size, class_num: Size, margin: float = 0.35, scale: Scale = 64.0
    ) -> None:
        super().__init__(embedding_size, class_num)
        self.margin = margin
        self.scale = scale

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x)
        if not self.training or label is None:
            return cos
        return self.scale * (cos - self.margin * self.one_hot(label, cos))
