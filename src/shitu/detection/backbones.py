"""Detection backbones of PP-PicoDet: ESNet (PicoDet-S/M/L 2021) and PP-LCNet (mainbody detector).

Layer widths, block tables and the order of operations follow the PicoDet paper and
PaddleDetection's published architectures, so that weights exported from Paddle (as
`.pdparams` or ONNX) load one to one. Each backbone returns the feature maps at
strides 8, 16 and 32 and exposes their widths as `out_channels`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from shitu.models.layers import ConvBNLayer, make_divisible


class HardSigmoidSE(nn.Module):
    """Squeeze-and-excitation gated by a hard sigmoid (ESNet, PP-LCNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // 4, 1)
        self.conv2 = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.relu(self.conv1(x.mean(dim=(2, 3), keepdim=True)))
        return x * nn.functional.hardsigmoid(self.conv2(gate))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ESBlock(nn.Module):
    """ESNet stride-1 unit: half the channels pass through, the other half is refined."""

    def __init__(self, channels: int, mid_channels: int) -> None:
        super().__init__()
        half = mid_channels // 2
        self.conv_pw = ConvBNLayer(channels // 2, half, 1, act="hardswish")
        self.conv_dw = ConvBNLayer(half, half, 3, groups=half, act=None)
        self.se = HardSigmoidSE(mid_channels)
        self.conv_linear = ConvBNLayer(mid_channels, channels // 2, 1, act="hardswish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        x2 = self.conv_pw(x2)
        x3 = self.se(torch.cat([x2, self.conv_dw(x2)], dim=1))
        return channel_shuffle(torch.cat([x1, self.conv_linear(x3)], dim=1), 2)


class ESBlockDown(nn.Module):
    """ESNet stride-2 unit: two downsampling branches, then a depthwise-pointwise fuse."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        half = mid_channels // 2
        self.conv_dw_1 = ConvBNLayer(in_channels, in_channels, 3, 2, groups=in_channels, act=None)
        self.conv_linear_1 = ConvBNLayer(in_channels, out_channels // 2, 1, act="hardswish")
        self.conv_pw_2 = ConvBNLayer(in_channels, half, 1, act="hardswish")
        self.conv_dw_2 = ConvBNLayer(half, half, 3, 2, groups=half, act=None)
        self.se = HardSigmoidSE(half)
        self.conv_linear_2 = ConvBNLayer(half, out_channels // 2, 1, act="hardswish")
        self.conv_dw_mv1 = ConvBNLayer(
            out_channels, out_channels, 3, groups=out_channels, act="hardswish"
        )
        self.conv_pw_mv1 = ConvBNLayer(out_channels, out_channels, 1, act="hardswish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv_linear_1(self.conv_dw_1(x))
        x2 = self.conv_linear_2(self.se(self.conv_dw_2(self.conv_pw_2(x))))
        return self.conv_pw_mv1(self.conv_dw_mv1(torch.cat([x1, x2], dim=1)))


class ESNet(nn.Module):
    """Enhanced ShuffleNet (PicoDet); `channel_ratio` scales each block's hidden width."""

    STAGE_REPEATS = (3, 7, 3)
    FEATURE_MAPS = (4, 11, 14)  # the blocks (counted from 2) ending strides 8, 16 and 32

    def __init__(self, scale: float = 1.0, channel_ratio: tuple[float, ...] = (1.0,) * 13) -> None:
        super().__init__()
        if len(channel_ratio) != sum(self.STAGE_REPEATS):
            raise ValueError(f"ESNet needs {sum(self.STAGE_REPEATS)} channel ratios")
        widths = [24] + [make_divisible(c * scale, 16) for c in (128, 256, 512)]
        self.conv1 = ConvBNLayer(3, widths[0], 3, 2, act="hardswish")
        self.max_pool = nn.MaxPool2d(3, 2, 1)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        self.out_channels: list[int] = []
        index = 0
        for stage, repeats in enumerate(self.STAGE_REPEATS):
            out_c = widths[stage + 1]
            for i in range(repeats):
                mid = make_divisible(int(out_c * channel_ratio[index]), 8)
                if i == 0:
                    block: nn.Module = ESBlockDown(widths[stage], mid, out_c)
                else:
                    block = ESBlock(out_c, mid)
                blocks[f"{stage + 2}_{i + 1}"] = block
                index += 1
                if index + 1 in self.FEATURE_MAPS:
                    self.out_channels.append(out_c)
        self.blocks = nn.Sequential(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.max_pool(self.conv1(x))
        outs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 2 in self.FEATURE_MAPS:
                outs.append(x)
        return outs


class DepthwiseSeparable(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, stride: int, kernel: int, use_se: bool
    ) -> None:
        super().__init__()
        self.dw_conv = ConvBNLayer(
            in_channels, in_channels, kernel, stride, groups=in_channels, act="hardswish"
        )
        self.se = HardSigmoidSE(in_channels) if use_se else nn.Identity()
        self.pw_conv = ConvBNLayer(in_channels, out_channels, 1, act="hardswish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.se(self.dw_conv(x)))


# PP-LCNet blocks: (kernel, in, out, stride, SE) per stage 2..6 (PP-LCNet paper, table 1).
LCNET_STAGES: tuple[tuple[tuple[int, int, int, int, bool], ...], ...] = (
    ((3, 16, 32, 1, False),),
    ((3, 32, 64, 2, False), (3, 64, 64, 1, False)),
    ((3, 64, 128, 2, False), (3, 128, 128, 1, False)),
    ((3, 128, 256, 2, False),) + ((5, 256, 256, 1, False),) * 5,
    ((5, 256, 512, 2, True), (5, 512, 512, 1, True)),
)


class LCNet(nn.Module):
    """PP-LCNet (v1) returning the outputs of stages FEATURE_MAPS (3/4/5 = strides 8/16/32)."""

    FEATURE_MAPS = (3, 4, 5)
    blocks2: nn.Sequential  # added by add_module, as blocks3 to blocks6 are

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = ConvBNLayer(3, make_divisible(16 * scale), 3, 2, act="hardswish")
        for stage, table in enumerate(LCNET_STAGES, start=2):
            layers = [
                DepthwiseSeparable(make_divisible(i * scale), make_divisible(o * scale), s, k, se)
                for k, i, o, s, se in table
            ]
            self.add_module(f"blocks{stage}", nn.Sequential(*layers))
        self.out_channels = [
            make_divisible(table[-1][2] * scale)
            for feature, table in enumerate(LCNET_STAGES[1:], start=2)
            if feature in self.FEATURE_MAPS
        ]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.blocks2(self.conv1(x))
        outs = []
        for stage in range(3, 7):
            x = getattr(self, f"blocks{stage}")(x)
            if stage - 1 in self.FEATURE_MAPS:
                outs.append(x)
        return outs
