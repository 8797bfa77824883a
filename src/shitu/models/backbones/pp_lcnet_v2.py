"""PP-LCNetV2 (PaddleClas), with the PP-ShiTuV2 recognition variant.

Module and parameter names mirror PaddleClas so its `.pdparams` map one to one.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from shitu.models.backbones.base import SequentialBackbone
from shitu.models.layers import (
    ActivationName,
    ConvBNLayer,
    DownscaleInInferDropout,
    DropoutProbability,
    SEModule,
    make_activation,
    make_divisible,
)
from shitu.registry import BACKBONES, ConfigPath, Size


class StageSpec(NamedTuple):
    in_channels: int
    kernel_size: int
    split_pw: bool
    use_rep: bool
    use_se: bool
    use_shortcut: bool


# Channel counts are for scale 1.0; each stage doubles them in its first block.
STAGES = (
    StageSpec(64, 3, False, False, False, False),
    StageSpec(128, 3, False, False, False, False),
    StageSpec(256, 5, True, True, True, False),
    StageSpec(512, 5, False, True, False, True),
)


class RepDepthwiseSeparable(nn.Module):
    """Depthwise (optionally re-parameterisable) + SE + pointwise block.

    With `use_rep`, the depthwise conv is a sum of parallel conv+BN branches with
    kernels dw_size, dw_size-2, ..., 1 (no 1x1 branch when strided). After
    `reparameterize()` they are one biased depthwise conv of size dw_size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        dw_size: int = 3,
        split_pw: bool = False,
        use_rep: bool = False,
        use_se: bool = False,
        use_shortcut: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stride = stride
        self.dw_size = dw_size
        self.use_rep = use_rep
        self.is_repped = False
        self.use_shortcut = use_shortcut and stride == 1 and in_channels == out_channels

        if use_rep:
            self.dw_conv_list = nn.ModuleList(
                ConvBNLayer(in_channels, in_channels, k, stride, groups=in_channels, act=None)
                for k in range(dw_size, 0, -2)
                if not (k == 1 and stride != 1)
            )
            self.act = make_activation(act)
        else:  # PaddleClas builds this one with its default activation, ReLU, whatever `act`
            self.dw_conv = ConvBNLayer(
                in_channels, in_channels, dw_size, stride, groups=in_channels, act="relu"
            )
        self.se = SEModule(in_channels, act=act) if use_se else nn.Identity()
        self.split_pw = split_pw
        if split_pw:
            half = int(out_channels * 0.5)
            self.pw_conv_1 = ConvBNLayer(in_channels, half, 1, act=act)
            self.pw_conv_2 = ConvBNLayer(half, out_channels, 1, act=act)
        else:
            self.pw_conv = ConvBNLayer(in_channels, out_channels, 1, act=act)

    @property
    def paddle_unused_params(self) -> tuple[str, ...]:
        """PaddleClas's tensors of this block that carry nothing: the fused conv it keeps
        beside unfolded branches, and the weight of the activation it builds for a block
        without branches too, which only those use (a PReLU's)."""
        if not self.use_rep:
            return ("act._weight",)
        return () if self.is_repped else ("dw_conv.weight", "dw_conv.bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_rep:
            y = self.dw_conv(x)
        elif self.is_repped:
            y = self.act(self.dw_conv(x))
        else:
            y = self.dw_conv_list[0](x)
            for branch in self.dw_conv_list[1:]:
                y = y + branch(x)
            y = self.act(y)
        y = self.se(y)
        y = self.pw_conv_2(self.pw_conv_1(y)) if self.split_pw else self.pw_conv(y)
        return y + x if self.use_shortcut else y

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the parallel conv+BN branches into one biased depthwise conv.

        Uses the BN running statistics, so eval-mode outputs are unchanged.
        """
        if not self.use_rep or self.is_repped:
            return
        kernel = torch.zeros_like(self.dw_conv_list[0].conv.weight)
        bias = torch.zeros(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
        for branch in self.dw_conv_list:
            k, b = branch.fused_kernel_bias()
            pad = (self.dw_size - k.shape[-1]) // 2
            kernel += F.pad(k, [pad, pad, pad, pad])
            bias += b
        fused = nn.Conv2d(
            self.in_channels,
            self.in_channels,
            self.dw_size,
            stride=self.stride,
            padding=(self.dw_size - 1) // 2,
            groups=self.in_channels,
            bias=True,
        ).to(device=kernel.device, dtype=kernel.dtype)  # a half/bf16 model stays so
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        self.dw_conv = fused
        del self.dw_conv_list
        self.is_repped = True


class PPLCNetV2(SequentialBackbone):
    """PP-LCNetV2 classification network; the ShiTu options make it a retrieval embedder.

    Args:
        scale: channel multiplier (small 0.75, base 1.0, large 1.25).
        depths: blocks per stage.
        class_num: classifier outputs (the `fc` layer; dropped by `stop_after("flatten")`).
        dropout_prob: dropout before `fc`, Paddle 'downscale_in_infer' semantics.
        use_last_conv: 1x1 conv to `class_expand` channels after global pooling.
        class_expand: output channels of `last_conv` (the embedding size in ShiTu).
        act: activation of every block.
        last_stride: stride of the last stage (ShiTu uses 1 to keep spatial detail).
        last_conv_bias: give `last_conv` a bias (ShiTu).
        last_act: apply the activation after `last_conv` (ShiTu removes it).
        pretrained: path of weights to load (.safetensors, .pt/.pth or PaddleClas .pdparams);
            tensors whose shape does not fit are skipped and reported.
    """

    def __init__(
        self,
        scale: float = 1.0,
        depths: tuple[int, int, int, int] = (2, 2, 6, 2),
        class_num: Size = 1000,
        dropout_prob: DropoutProbability = 0.0,
        use_last_conv: bool = True,
        class_expand: Size = 1280,
        act: ActivationName = "relu",
        last_stride: Literal[1, 2] = 2,
        last_conv_bias: bool = False,
        last_act: bool = True,
        pretrained: ConfigPath | bool | None = None,
    ) -> None:
        super().__init__()
        if len(depths) != len(STAGES):
            raise ValueError(f"depths needs {len(STAGES)} entries, got {len(depths)}")
        stem_out = make_divisible(32 * scale)
        self.stem = nn.Sequential(
            ConvBNLayer(3, stem_out, 3, stride=2, act=act),
            RepDepthwiseSeparable(
                stem_out, make_divisible(64 * scale), stride=1, dw_size=3, act=act
            ),
        )
        stages = []
        for index, (spec, depth) in enumerate(zip(STAGES, depths, strict=True)):
            first_stride = last_stride if index == len(STAGES) - 1 else 2
            out_channels = make_divisible(spec.in_channels * 2 * scale)
            stages.append(
                nn.Sequential(
                    *(
                        RepDepthwiseSeparable(
                            make_divisible(spec.in_channels * scale) if i == 0 else out_channels,
                            out_channels,
                            stride=first_stride if i == 0 else 1,
                            dw_size=spec.kernel_size,
                            split_pw=spec.split_pw,
                            use_rep=spec.use_rep,
                            use_se=spec.use_se,
                            use_shortcut=spec.use_shortcut,
                            act=act,
                        )
                        for i in range(depth)
                    )
                )
            )
        self.stages = nn.Sequential(*stages)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        features = make_divisible(STAGES[-1].in_channels * 2 * scale)
        self.layer_order = ["stem", "stages", "avg_pool"]
        if use_last_conv:
            self.last_conv = nn.Conv2d(features, class_expand, 1, bias=last_conv_bias)
            self.act = make_activation(act if last_act else None)
            self.dropout = DownscaleInInferDropout(dropout_prob)
            self.layer_order += ["last_conv", "act", "dropout"]
            features = class_expand
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(features, class_num)
        self.layer_order += ["flatten", "fc"]
        if pretrained:
            from shitu.checkpoint import load_pretrained

            self.pretrained_tensors = frozenset(load_pretrained(self, pretrained).loaded)


_SCALES = {
    "small": {"scale": 0.75, "depths": (2, 2, 4, 2)},
    "base": {"scale": 1.0, "depths": (2, 2, 6, 2)},
    "large": {"scale": 1.25, "depths": (2, 2, 8, 2)},
}
# The PP-ShiTuV2 embedder: stride-1 last stage, biased last_conv, no ReLU after it, 512-d.
_SHITU = {"last_stride": 1, "last_conv_bias": True, "last_act": False, "class_expand": 512}

for _size, _fixed in _SCALES.items():
    BACKBONES.register_variant(f"PPLCNetV2_{_size}", PPLCNetV2, _fixed, dropout_prob=0.2)
    BACKBONES.register_variant(
        f"PPLCNetV2_{_size}_ShiTu", PPLCNetV2, _fixed, dropout_prob=0.2, **_SHITU
    )
