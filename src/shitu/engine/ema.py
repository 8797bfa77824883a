"""Exponential moving average of a model's weights (PaddleClas's `EMA: {decay: ...}`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """A copy of the model whose weights follow the trained ones' moving average.

    The average is bias-corrected: step t weighs the weights after update s by
    `decay ** (t - s)`, normalised, so the random initial weights of new layers do not
    linger in it as they would in a plain EMA of a short fine-tuning run. BatchNorm
    statistics are averaged like weights; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        averaged = self.module.state_dict()
        self._pairs = [(averaged[name], tensor) for name, tensor in model.state_dict().items()]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the trained model's current weights into the average."""
        self.updates += 1
        weight = (1.0 - self.decay) / (1.0 - self.decay**self.updates)
        averaged = [(a, m) for a, m in self._pairs if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in averaged], [m for _, m in averaged], weight)
        for a, m in self._pairs:
            if not a.is_floating_point():
                a.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
