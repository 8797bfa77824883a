"""PicoHead (GFL style): per level a stack of depthwise/pointwise convs, then one 1x1 conv
that predicts class logits and, for each box side, a distribution over reg_max+1 bins."""

from __future__ import annotations

import math

import torch
from torch import nn

from shitu.models.layers import ConvBNLayer

# The class probability the untrained head starts at (its logits' bias): the focal-loss
# prior, so that the many background cells do not swamp the first steps.
PRIOR_PROB = 0.01


class PicoFeat(nn.Module):
    """Shared class/box tower: `num_convs` x (dw 5x5 -> act -> pw 1x1 -> act) per level."""

    def __init__(self, channels: int, num_levels: int, num_convs: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.Sequential(
                *[
                    layer
                    for _ in range(num_convs)
                    for layer in (
                        ConvBNLayer(channels, channels, 5, groups=channels, act="hardswish"),
                        ConvBNLayer(channels, channels, 1, act="hardswish"),
                    )
                ]
            )
            for _ in range(num_levels)
        )

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        return self.levels[level](x)


class PicoHead(nn.Module):
    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_levels: int,
        num_convs: int,
        reg_max: int,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv_feat = PicoFeat(channels, num_levels, num_convs)
        out = num_classes + 4 * (reg_max + 1)
        self.head_cls = nn.ModuleList(nn.Conv2d(channels, out, 1) for _ in range(num_levels))
        prior_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for conv in self.head_cls:
            # the convs made above (ModuleList yields Modules, Conv2d's bias is optional)
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            nn.init.constant_(conv.bias[:num_classes], prior_bias)

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: class logits [B, C, H, W] and side distributions [B, 4(R+1), H, W]."""
        cls_logits, reg_dists = [], []
        for level, feat in enumerate(feats):
            out = self.head_cls[level](self.conv_feat(feat, level))
            cls_logits.append(out[:, : self.num_classes])
            reg_dists.append(out[:, self.num_classes :])
        return cls_logits, reg_dists
