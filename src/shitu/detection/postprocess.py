"""Decoding of PicoDet head outputs in torch, for the model's ONNX graph and its training
loss, and box IoU for the label assigner.

Boxes are decoded GFL style: each side's offset is the expectation of a softmax over
reg_max+1 bins, times the level's stride, measured from the cell centre
(`(index + cell_offset) * stride`). Inference decodes PaddleDetection's ONNX outputs, and
runs NMS, in numpy (`shitu.detection.boxes`), without torch.
"""

from __future__ import annotations

import torch

from shitu.detection.boxes import cell_centres


def anchor_points(
    shapes: list[tuple[int, int]], strides: list[int], cell_offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres in input pixels [N, 2] (x, y) and each cell's stride [N], level by level:
    `boxes.cell_centres`, as tensors."""
    points, level_strides = cell_centres(shapes, strides, cell_offset)
    return torch.from_numpy(points), torch.from_numpy(level_strides)


def distribution_expectation(reg: torch.Tensor) -> torch.Tensor:
    """[..., 4 * (R + 1)] bin logits -> [..., 4] expected offsets in units of the stride."""
    bins = reg.reshape(*reg.shape[:-1], 4, -1).softmax(dim=-1)
    project = torch.arange(bins.shape[-1], dtype=bins.dtype, device=bins.device)
    return bins @ project


def decode_boxes(reg: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """[B, N, 4(R+1)] distributions -> [B, N, 4] boxes (x1, y1, x2, y2) in input pixels."""
    dist = distribution_expectation(reg) * strides[:, None]
    return torch.cat([points - dist[..., :2], points + dist[..., 2:]], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU [N, M] of xyxy boxes (boxes with negative extent have zero area)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))
