"""PP-PicoDet = backbone (ESNet or PP-LCNet) + CSP-PAN + PicoHead, and its named architectures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from shitu.detection.backbones import ESNet, LCNet
from shitu.detection.head import PicoHead
from shitu.detection.neck import CSPPAN
from shitu.detection.postprocess import anchor_points, decode_boxes
from shitu.errors import ConfigError


@dataclass(frozen=True)
class PicoDetArch:
    """Everything needed to rebuild a PicoDet; stored inside our checkpoints."""

    backbone: str
    scale: float
    num_classes: int
    neck_channels: int
    head_convs: int
    input_size: int
    channel_ratio: tuple[float, ...] = ()
    strides: tuple[int, ...] = (8, 16, 32, 64)
    reg_max: int = 7
    cell_offset: float = 0.5
    class_names: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        """The fields, as a checkpoint records them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PicoDetArch:
        """From `to_dict`'s form (lists for tuples); unknown keys are a ConfigError."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown detector architecture keys: {sorted(unknown)}")
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples})


# Published PicoDet configurations (PaddleDetection, 2021 "legacy" PicoDet family).
ARCHS: dict[str, PicoDetArch] = {
    "picodet_s_esnet": PicoDetArch(
        backbone="ESNet",
        scale=0.75,
        channel_ratio=(0.875, 0.5, 0.5, 0.5, 0.625, 0.5, 0.625, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5),
        num_classes=80,
        neck_channels=96,
        head_convs=2,
        input_size=416,
    ),
    "picodet_m_esnet": PicoDetArch(
        backbone="ESNet",
        scale=1.0,
        channel_ratio=(
            0.875,
            0.5,
            1.0,
            0.625,
            0.5,
            0.75,
            0.625,
            0.625,
            0.5,
            0.625,
            1.0,
            0.625,
            0.75,
        ),
        num_classes=80,
        neck_channels=128,
        head_convs=4,
        input_size=416,
    ),
    # PP-ShiTuV2 mainbody detector: PicoDet with PP-LCNet x2.5, one class, 640x640.
    "picodet_lcnet_x2_5_mainbody": PicoDetArch(
        backbone="LCNet",
        scale=2.5,
        num_classes=1,
        neck_channels=128,
        head_convs=4,
        input_size=640,
        class_names=("foreground",),
    ),
}


def resolve_arch(arch: str | PicoDetArch | dict, **overrides) -> PicoDetArch:
    if isinstance(arch, PicoDetArch):
        base = arch
    elif isinstance(arch, dict):
        base = PicoDetArch.from_dict(arch)
    elif arch in ARCHS:
        base = ARCHS[arch]
    else:
        raise ConfigError(f"unknown detector architecture '{arch}'; known: {', '.join(ARCHS)}")
    return PicoDetArch.from_dict({**base.to_dict(), **overrides}) if overrides else base


class PicoDet(nn.Module):
    def __init__(self, arch: PicoDetArch) -> None:
        super().__init__()
        self.arch = arch
        if arch.backbone == "ESNet":
            self.backbone: ESNet | LCNet = ESNet(arch.scale, arch.channel_ratio)
        elif arch.backbone == "LCNet":
            self.backbone = LCNet(arch.scale)
        else:
            raise ConfigError(f"unknown detector backbone '{arch.backbone}' (ESNet, LCNet)")
        levels = len(arch.strides)
        self.neck = CSPPAN(self.backbone.out_channels, arch.neck_channels, num_features=levels)
        self.head = PicoHead(
            arch.neck_channels, arch.num_classes, levels, arch.head_convs, arch.reg_max
        )

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level class logits [B, C, H, W] and box distributions [B, 4(R+1), H, W]."""
        return self.head(self.neck(self.backbone(images)))

    def raw_outputs(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Sigmoid scores [B, N, C], distributions [B, N, 4(R+1)] with the levels concatenated
        (PaddleDetection's ONNX export layout, its per-level outputs side by side), and
        the level sizes."""
        cls_logits, reg_dists = self(images)
        scores = torch.cat([c.flatten(2).transpose(1, 2) for c in cls_logits], dim=1).sigmoid()
        reg = torch.cat([r.flatten(2).transpose(1, 2) for r in reg_dists], dim=1)
        return scores, reg, [(c.shape[2], c.shape[3]) for c in cls_logits]

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores [B, N, C] and decoded boxes [B, N, 4] in input pixels (the ONNX export)."""
        scores, reg, shapes = self.raw_outputs(images)
        points, strides = anchor_points(shapes, list(self.arch.strides), self.arch.cell_offset)
        return scores, decode_boxes(reg, points.to(reg), strides.to(reg))


def build_picodet(arch: str | PicoDetArch | dict, **overrides: object) -> PicoDet:
    """A PicoDet with random weights: `arch` a name in `ARCHS`, a `PicoDetArch` or its dict;
    `overrides` replace its fields (`num_classes=1`, `input_size=320`, ...)."""
    return PicoDet(resolve_arch(arch, **overrides))
