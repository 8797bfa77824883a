"""Cross-entropy with optional label smoothing."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shitu.registry import LOSSES


@LOSSES.register("CELoss")
class CELoss(nn.Module):
    """Softmax cross-entropy on logits; `epsilon` > 0 smooths the one-hot target.

    The smoothed target is (1 - epsilon) * one_hot + epsilon / num_classes.
    """

    input_key: ClassVar[str] = "logits"

    def __init__(self, epsilon: float | None = None) -> None:
        super().__init__()
        if epsilon is not None and not 0.0 <= epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon or 0.0

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, label.reshape(-1).long(), label_smoothing=self.epsilon)
