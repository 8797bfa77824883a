"""ResNet (He et al. 2016) and its `vd` variant (Bag of Tricks, He et al. 2019).

Plain ResNets use torchvision's module names and layout, so a torchvision
`resnet*.pth` state dict loads with every key matched. The `vd` variants (deep
3x3 stem, average-pool shortcut downsampling) use timm's `resnet*d` layout
(`conv1` becomes a Sequential, shortcuts are `downsample.{1,2}` after a pool at
index 0), so those files load the same way. PaddleClas `.pdparams` of ResNets use
other names (`stem.N.conv`, `blocks.K.conv0`) and do not map onto these modules; nor does
their ResNet18/34 architecture quite: PaddleClas gives the first block a 1x1 projection
shortcut even where the shape does not change, torchvision and timm (and these) an identity.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from shitu.models.backbones.base import SequentialBackbone
from shitu.registry import BACKBONES, ConfigPath, Size

# PaddleClas's names for the layers of its ResNet, for `BackboneStopLayer` in its configs.
PADDLE_LAYER_NAMES = {
    "stem": "relu",
    "max_pool": "maxpool",
    "blocks": "layer4",
    "avg_pool": "avgpool",
}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), residual (ResNet-50 and deeper).

    The stride sits on the 3x3 conv ("ResNet v1.5", as torchvision and PaddleClas),
    not on the first 1x1 conv as in the paper, which would skip 3/4 of the input.
    """

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


def make_downsample(in_channels: int, out_channels: int, stride: int, vd: bool) -> nn.Sequential:
    """Projection shortcut for a block that changes resolution or width.

    Plain: strided 1x1 conv + BN (torchvision). vd: 2x2 average pool, then an
    unstrided 1x1 conv + BN, so the shortcut sees every input pixel instead of a
    quarter of them; the pool is an Identity at stride 1, keeping timm's indices.
    """
    if not vd:
        return nn.Sequential(
            conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        )
    pool: nn.Module = (
        nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        if stride != 1
        else nn.Identity()
    )
    return nn.Sequential(pool, conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels))


class ResNet(SequentialBackbone):
    """ResNet classifier; `stop_after("flatten")` makes it a pooled-feature extractor.

    Args:
        block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50 and deeper).
        layers: blocks in each of the four stages.
        vd: Bag-of-Tricks "D" tweaks: three 3x3 convs (32, 32, 64 channels) as stem
            and average-pool shortcut downsampling.
        class_num: classifier outputs (the `fc` layer).
        last_stride: stride of the last stage; 1 keeps twice the spatial resolution
            (stride 16 overall), which helps retrieval and re-identification.
        zero_init_residual: start each block's last BN at gamma 0, so every block is
            an identity at first (Goyal et al. 2017); helps large-batch training.
        pretrained: path of weights to load (.safetensors, .pt/.pth, e.g. a torchvision or
            timm ResNet state dict); tensors whose shape does not fit (fc) are skipped.
    """

    # Why no .pdparams loads (the module docstring): said in place of the few tensors of
    # another naming that happen to fit (`fc`), loaded without the rest.
    paddle_weights_unmapped = (
        "PaddleClas's ResNet .pdparams name their layers otherwise (stem.N.conv, "
        "blocks.K.conv0) and do not map onto shitu's ResNets, which take torchvision or timm "
        "ResNet weights (.pth, .safetensors)"
    )

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: tuple[int, int, int, int],
        vd: bool = False,
        class_num: Size = 1000,
        last_stride: Literal[1, 2] = 2,
        zero_init_residual: bool = False,
        pretrained: ConfigPath | bool | None = None,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got '{block}'")
        if len(layers) != 4:
            raise ValueError(f"layers needs 4 entries, got {len(layers)}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        block_cls = BLOCKS[block]
        self.vd = vd
        if vd:
            self.conv1: nn.Module = nn.Sequential(
                conv3x3(3, 32, stride=2),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                conv3x3(32, 32),
                nn.BatchNorm2d(32),
                nn.ReLU(inplace=True),
                conv3x3(32, 64),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else (last_stride if index == 3 else 2)
            stage, in_channels = self._make_stage(block_cls, in_channels, planes, depth, stride)
            setattr(self, f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_channels, class_num)
        self.out_channels = in_channels
        self.layer_order = [
            "conv1",
            "bn1",
            "relu",
            "maxpool",
            "layer1",
            "layer2",
            "layer3",
            "layer4",
            "avgpool",
            "flatten",
            "fc",
        ]
        self._init_weights(zero_init_residual)
        if pretrained:
            from shitu.checkpoint import load_pretrained

            self.pretrained_tensors = frozenset(load_pretrained(self, pretrained).loaded)

    def _make_stage(
        self,
        block_cls: type[BasicBlock] | type[Bottleneck],
        in_channels: int,
        planes: int,
        depth: int,
        stride: int,
    ) -> tuple[nn.Sequential, int]:
        out_channels = planes * block_cls.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = make_downsample(in_channels, out_channels, stride, self.vd)
        blocks = [block_cls(in_channels, planes, stride, downsample)]
        blocks += [block_cls(out_channels, planes) for _ in range(depth - 1)]
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self, zero_init_residual: bool) -> None:
        """He init for convs (as torchvision); the fc keeps PyTorch's default init."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock | Bottleneck):
                    nn.init.zeros_(module.last_bn.weight)

    def stop_after(self, layer_name: str) -> None:
        """Also accept PaddleClas's layer names (avg_pool, max_pool, stem, blocks)."""
        super().stop_after(PADDLE_LAYER_NAMES.get(layer_name, layer_name))


DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

for _depth, (_block, _layers) in DEPTHS.items():
    BACKBONES.register_variant(
        f"ResNet{_depth}", ResNet, {"block": _block, "layers": _layers, "vd": False}
    )
    BACKBONES.register_variant(
        f"ResNet{_depth}_vd", ResNet, {"block": _block, "layers": _layers, "vd": True}
    )
# PaddleClas's name for the stride-16 ResNet50 of its re-identification configs.
BACKBONES.register_variant(
    "ResNet50_last_stage_stride1",
    ResNet,
    {"block": "bottleneck", "layers": DEPTHS[50][1], "vd": False, "last_stride": 1},
)
