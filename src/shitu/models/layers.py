"""Small building blocks shared by backbones (names follow PaddleClas for weight import)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

# A backbone's dropout before its classifier: 1 would drop every unit.
DropoutProbability = Annotated[float, Field(ge=0, lt=1)]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "prelu": nn.PReLU,
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=0.1),
}
# A backbone's `act` setting: one of ACTIVATIONS, refused otherwise as the config loads.
ActivationName = Literal["relu", "relu6", "hardswish", "prelu", "leaky_relu"]


def make_activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation '{name}'; available: {', '.join(ACTIVATIONS)}"
        ) from None


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNLayer(nn.Module):
    """Conv (no bias, 'same' padding) -> BatchNorm -> optional activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        )
        nn.init.kaiming_normal_(self.conv.weight)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of a single conv equal to conv -> BN in eval mode."""
        bn = self.bn
        std = (bn.running_var + bn.eps).sqrt()
        scale = bn.weight / std
        kernel = self.conv.weight * scale.reshape(-1, 1, 1, 1)
        return kernel, bn.bias - bn.running_mean * scale


class SEModule(nn.Module):
    """Squeeze-and-excitation with a sigmoid gate, as in PP-LCNetV2."""

    def __init__(self, channels: int, reduction: int = 4, act: str = "relu") -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.act = make_activation(act)
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.gate(self.conv2(self.act(self.conv1(self.avg_pool(x)))))
        return x * weight


# GeM's exponent, from average pooling (1) towards max pooling (large p). Below 1 the mean
# weighs the weakest responses most, and from 0 down it is no mean at all (x^0 = 1): a
# config's value is refused, and a learned one is kept at 1 or above (see the forward).
MIN_GEM_EXPONENT = 1.0
GemExponent = Annotated[float, Field(ge=MIN_GEM_EXPONENT, allow_inf_nan=False)]


class GeneralizedMeanPool(nn.Module):
    """Global power-mean pooling (GeM, Radenovic et al. 2018) with a learned exponent.

    (mean(x^p))^(1/p) over each channel map: p = 1 is average pooling, large p tends
    to max pooling, so training can weight the strongest local responses of a crop
    (a logo, a label) more than the background. Output is N x C x 1 x 1 like
    `nn.AdaptiveAvgPool2d(1)`; inputs are clamped to `eps` because the power needs
    non-negative values (backbones feed it ReLU-family outputs). The exponent used is
    at least `MIN_GEM_EXPONENT`: a training forward first puts a learned `p` that an
    optimizer step took below it back on it (where a gradient can take it up again,
    which a clamp alone would stop), and any forward uses it for a lower `p` (of a weight
    file). Each map is divided by its maximum before the power, which would overflow
    float32 from p = 50 on for ReLU6 outputs (6^50).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if not MIN_GEM_EXPONENT <= p < math.inf:
            raise ValueError(
                f"GeM exponent p must be a finite number of at least {MIN_GEM_EXPONENT:g} "
                f"(average pooling), got {p}"
            )
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p.requires_grad:
            with torch.no_grad():
                self.p.clamp_(min=MIN_GEM_EXPONENT)
        # float32 whatever the autocast dtype: x^3 of bf16 activations loses the mean.
        p = self.p.float().clamp(min=MIN_GEM_EXPONENT)
        values = x.float().clamp(min=self.eps)
        # GeM is homogeneous in x: scaling a map by a constant and back changes no gradient.
        peak = values.amax(dim=(2, 3), keepdim=True).detach()
        pooled = nn.functional.adaptive_avg_pool2d((values / peak).pow(p), 1)
        return (pooled.pow(1.0 / p) * peak).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


GLOBAL_POOLS = {"avg": lambda: nn.AdaptiveAvgPool2d(1), "gem": GeneralizedMeanPool}
# A backbone's `pool` setting: one of GLOBAL_POOLS, refused otherwise as the config loads.
PoolName = Literal["avg", "gem"]


def check_global_pool(kind: str, gem_p: float | None = None) -> None:
    """ValueError('gem_p: ...') where `gem_p` is given for a pool other than GeM: a
    backbone's `check_params` calls it, so that a config is refused as it loads."""
    if gem_p is not None and kind != "gem":
        raise ValueError(f"gem_p: only pool 'gem' has an exponent, pool is '{kind}'")


def make_global_pool(kind: str, gem_p: float | None = None) -> nn.Module:
    """The N x C x H x W -> N x C x 1 x 1 pooling named by a backbone's `pool` option;
    `gem_p` is GeM's starting exponent (its default where None)."""
    check_global_pool(kind, gem_p)
    if gem_p is not None:
        return GeneralizedMeanPool(gem_p)
    try:
        return GLOBAL_POOLS[kind]()
    except KeyError:
        raise ValueError(f"unknown pool '{kind}'; available: {', '.join(GLOBAL_POOLS)}") from None


class DownscaleInInferDropout(nn.Module):
    """Paddle's `Dropout(mode='downscale_in_infer')`.

    Training drops units without rescaling the survivors; inference multiplies
    everything by (1 - p). PaddleClas's PP-LCNetV2 uses this mode, so features
    of converted models only match if inference applies the same factor.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0:
            return x
        if self.training:
            keep = torch.empty_like(x).bernoulli_(1.0 - self.p)
            return x * keep
        return x * (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=downscale_in_infer"
