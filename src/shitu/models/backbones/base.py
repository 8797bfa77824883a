"""Common behaviour of backbones: an ordered chain of named top-level layers."""

from __future__ import annotations

import torch
from torch import nn

from shitu.errors import ConfigError


class SequentialBackbone(nn.Module):
    """A backbone whose forward runs `self.layer_order` top-level layers in turn.

    That order is what makes `stop_after` (PaddleClas's `BackboneStopLayer`)
    possible: every layer after the named one is replaced by an identity and its
    parameters are dropped, so `stop_after("flatten")` turns a classifier into a
    feature extractor.
    """

    layer_order: list[str]
    # The state-dict names its `pretrained` weights gave values to; the others (a new
    # embedding layer, a classifier of another size) start from a random initialisation.
    pretrained_tensors: frozenset[str] = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layer_order:
            x = getattr(self, name)(x)
        return x

    def stop_after(self, layer_name: str) -> None:
        if layer_name not in self.layer_order:
            raise ConfigError(
                f"Arch.BackboneStopLayer.name: '{layer_name}' is not a layer of "
                f"{type(self).__name__}; choose one of: {', '.join(self.layer_order)}"
            )
        for name in self.layer_order[self.layer_order.index(layer_name) + 1 :]:
            setattr(self, name, nn.Identity())
