"""The BatchNorm a batch of one image would break, found by a forward pass.

A BatchNorm that trains on one value per channel raises torch's "Expected more than 1
value per channel when training": on pooled features (a BNNeck) or on a 1x1 feature map
(the last layers of a backbone or a detector's coarsest level, on small images). Both
trainers (`shitu train`, `shitu detect-train`) refuse such a run up front; the forward
pass finds the layer whatever the architecture, where stride arithmetic would have to
know every model's layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class OneValueNorm(NamedTuple):
    """A training BatchNorm that gets one value per channel from a batch of one image."""

    name: str
    # A 1x1 feature map, which larger images would widen; else pooled features (a BNNeck).
    on_feature_map: bool

    def describe(self, width: int, height: int) -> str:
        """What the layer gets from a `width` x `height` image, for an error message."""
        if self.on_feature_map:
            return (
                f"BatchNorm layer '{self.name}' gets a 1x1 feature map from the "
                f"{width}x{height} training images, one value per channel"
            )
        return (
            f"BatchNorm layer '{self.name}' (on pooled features, as a BNNeck) gets one value "
            "per channel"
        )


def norm_on_one_value_per_channel(model: nn.Module, image: torch.Tensor) -> OneValueNorm | None:
    """A BatchNorm that trains and sees one value per channel when `model` takes `image`
    (CHW) alone; None if there is none. One on a vector (a BNNeck) comes first: larger
    images would not help it. Found by a forward pass in eval mode (no statistics change),
    the model left in the mode it was in."""
    was_training = model.training
    model.train()  # frozen layers stay in eval mode, where one value is fine
    norms = {
        module: name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    }
    found: list[OneValueNorm] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if inputs[0][0].numel() == inputs[0].shape[1]:
            found.append(OneValueNorm(norms[module], inputs[0].ndim > 2))

    hooks = [module.register_forward_pre_hook(record) for module in norms]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(image.unsqueeze(0).to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return min(found, key=lambda hit: hit.on_feature_map, default=None)  # a vector first
