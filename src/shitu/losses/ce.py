"""Cross-entropy with optional label smoothing."""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from shitu.losses._pairs import zero_loss
from shitu.registry import LOSSES


@LOSSES.register("CELoss")
class CELoss(nn.Module):
    """Softmax cross-entropy on logits; `epsilon` > 0 smooths the one-hot target.

    The smoothed target is (1 - epsilon) * one_hot + epsilon / num_classes. An empty
    batch gives 0 (torch's mean over no rows is NaN).
    """

    input_key: ClassVar[str] = "logits"
    # Its input holds a score per class, indexed by the label (see the trainer's check).
    reads_class_scores: ClassVar[bool] = True

    def __init__(self, epsilon: Annotated[float, Field(ge=0, lt=1)] | None = None) -> None:
        super().__init__()
        self.epsilon = epsilon or 0.0

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] == 0:
            return zero_loss(logits)
        return F.cross_entropy(logits, label.reshape(-1).long(), label_smoothing=self.epsilon)
