"""CSP-PAN neck of PP-PicoDet: 1x1 channel alignment, top-down and bottom-up CSP fusion.

With `num_features=4` an extra stride-64 level is made from the stride-32 inputs and
outputs. The order of operations matches PaddleDetection's so that ONNX exports of
Paddle models, whose convolutions are read in graph order, map onto this module.
"""

from __future__ import annotations

import torch
from torch import nn

from shitu.models.layers import ConvBNLayer


class DPModule(nn.Module):
    """Depthwise conv -> BN -> act -> pointwise conv -> BN -> act."""

    def __init__(self, channels: int, kernel: int, stride: int = 1, act: str = "hardswish"):
        super().__init__()
        pad = (kernel - 1) // 2
        self.dwconv = nn.Conv2d(
            channels, channels, kernel, stride, pad, groups=channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(channels)
        self.pwconv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.Hardswish() if act == "hardswish" else nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.pwconv(self.act(self.bn1(self.dwconv(x))))))


class DarknetBottleneck(nn.Module):
    def __init__(self, channels: int, kernel: int, act: str) -> None:
        super().__init__()
        self.conv1 = ConvBNLayer(channels, channels, 1, act=act)
        self.conv2 = DPModule(channels, kernel, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class CSPLayer(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, num_blocks: int, act: str
    ) -> None:
        super().__init__()
        mid = out_channels // 2
        self.main_conv = ConvBNLayer(in_channels, mid, 1, act=act)
        self.short_conv = ConvBNLayer(in_channels, mid, 1, act=act)
        self.final_conv = ConvBNLayer(2 * mid, out_channels, 1, act=act)
        self.blocks = nn.Sequential(
            *[DarknetBottleneck(mid, kernel, act) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.short_conv(x)
        main = self.blocks(self.main_conv(x))
        return self.final_conv(torch.cat([main, short], dim=1))


class ChannelAlign(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int, act: str) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBNLayer(c, out_channels, 1, act=act) for c in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats, strict=True)]


class CSPPAN(nn.Module):
    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        kernel: int = 5,
        num_features: int = 4,
        num_csp_blocks: int = 1,
        act: str = "hardswish",
    ) -> None:
        super().__init__()
        levels = len(in_channels)
        if num_features not in (levels, levels + 1):
            raise ValueError(f"num_features must be {levels} or {levels + 1}")
        self.conv_t = ChannelAlign(in_channels, out_channels, act)
        self.extra_level = num_features == levels + 1
        if self.extra_level:
            self.first_top_conv = DPModule(out_channels, kernel, 2, act)
            self.second_top_conv = DPModule(out_channels, kernel, 2, act)

        def csp() -> CSPLayer:
            return CSPLayer(2 * out_channels, out_channels, kernel, num_csp_blocks, act)

        self.top_down_blocks = nn.ModuleList(csp() for _ in range(levels - 1))
        self.downsamples = nn.ModuleList(
            DPModule(out_channels, kernel, 2, act) for _ in range(levels - 1)
        )
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
