"""CSP-PAN neck of PP-PicoDet: 1x1 channel alignment, top-down and bottom-up CSP fusion.

With `num_features=4` an extra stride-64 level is made from the stride-32 inputs and
outputs. The order of operations matches PaddleDetection's so that ONNX exports of
Paddle models, whose convolutions are read in graph order, map onto this module.
"""

from __future__ import annotations

import torch
from torch import nn

from shitu.models.layers import ConvBNLayer

KERNEL = 5  # of the depthwise convs, as PP-PicoDet's CSP-PAN has them


class DPModule(nn.Module):
    """Depthwise conv -> BN -> hardswish -> pointwise conv -> BN -> hardswish."""

    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        self.dwconv = nn.Conv2d(
            channels, channels, KERNEL, stride, KERNEL // 2, groups=channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(channels)
        self.pwconv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.pwconv(self.act(self.bn1(self.dwconv(x))))))


class DarknetBottleneck(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNLayer(channels, channels, 1, act="hardswish")
        self.conv2 = DPModule(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class CSPLayer(nn.Module):
    """Two 1x1 branches, one through a DarknetBottleneck, fused by a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.main_conv = ConvBNLayer(in_channels, mid, 1, act="hardswish")
        self.short_conv = ConvBNLayer(in_channels, mid, 1, act="hardswish")
        self.final_conv = ConvBNLayer(2 * mid, out_channels, 1, act="hardswish")
        self.blocks = nn.Sequential(DarknetBottleneck(mid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.short_conv(x)
        main = self.blocks(self.main_conv(x))
        return self.final_conv(torch.cat([main, short], dim=1))


class ChannelAlign(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBNLayer(c, out_channels, 1, act="hardswish") for c in in_channels
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats, strict=True)]


class CSPPAN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int, num_features: int = 4) -> None:
        super().__init__()
        levels = len(in_channels)
        if num_features not in (levels, levels + 1):
            raise ValueError(f"num_features must be {levels} or {levels + 1}")
        self.conv_t = ChannelAlign(in_channels, out_channels)
        self.extra_level = num_features == levels + 1
        if self.extra_level:
            self.first_top_conv = DPModule(out_channels, 2)
            self.second_top_conv = DPModule(out_channels, 2)

        def csp() -> CSPLayer:
            return CSPLayer(2 * out_channels, out_channels)

        self.top_down_blocks = nn.ModuleList(csp() for _ in range(levels - 1))
        self.downsamples = nn.ModuleList(DPModule(out_channels, 2) for _ in range(levels - 1))
        self.bottom_up_blocks = nn.ModuleList(csp() for _ in range(levels - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        inputs = self.conv_t(feats)
        inner = [inputs[-1]]
        for block, low in zip(self.top_down_blocks, reversed(inputs[:-1]), strict=True):
            up = nn.functional.interpolate(inner[0], scale_factor=2.0, mode="nearest")
            inner.insert(0, block(torch.cat([up, low], dim=1)))
        outs = [inner[0]]
        for down, block, high in zip(
            self.downsamples, self.bottom_up_blocks, inner[1:], strict=True
        ):
            outs.append(block(torch.cat([down(outs[-1]), high], dim=1)))
        if self.extra_level:
            outs.append(self.first_top_conv(inputs[-1]) + self.second_top_conv(outs[-1]))
        return outs
