"""Common behaviour of backbones: an ordered chain of named top-level layers."""

from __future__ import annotations

import re

import torch
from torch import nn

from shitu.errors import ConfigError, did_you_mean


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
            # PaddleClas's configs name some layers as Paddle numbers them (`flatten_0`).
            numbered = re.fullmatch(r"(.+)_\d+", layer_name)
            if numbered and numbered[1] in self.layer_order:
                hint = f" (PaddleClas's {layer_name}: shitu calls it '{numbered[1]}')"
            else:
                hint = did_you_mean(layer_name, self.layer_order)
            raise ConfigError(
                f"Arch.BackboneStopLayer.name: '{layer_name}' is not a layer of "
                f"{type(self).__name__}; choose one of: {', '.join(self.layer_order)}{hint}"
            )
        for name in self.layer_order[self.layer_order.index(layer_name) + 1 :]:
            setattr(self, name, nn.Identity())
