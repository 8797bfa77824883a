"""PicoDet's training losses: Varifocal (classification + IoU-aware score), Distribution
Focal (box side distributions) and GIoU (decoded boxes), plus the loss of a whole batch.

Weights follow the published PicoDet configs: VFL 1.0 (alpha 0.75, gamma 2), GIoU 2.0,
DFL 0.25; box losses are weighted by each positive's predicted score and normalised by
their sum, the classification loss by the number of positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shitu.detection.assigner import simota_assign
from shitu.detection.postprocess import anchor_points, decode_boxes

EPS = 1e-7
# The weights of the VFL, GIoU and DFL losses, as PaddleDetection's PicoDet configs set them
LOSS_WEIGHTS = (1.0, 2.0, 0.25)


def _area(box: torch.Tensor) -> torch.Tensor:
    return (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)


def _iou_and_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(0)
    inter = wh[..., 0] * wh[..., 1]
    union = _area(a) + _area(b) - inter + EPS
    return inter / union, union


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of xyxy boxes [..., 4]."""
    return _iou_and_union(a, b)[0]


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise generalised IoU of xyxy boxes [..., 4] (in [-1, 1])."""
    overlap, union = _iou_and_union(a, b)
    hull = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    hull_area = hull[..., 0] * hull[..., 1] + EPS
    return overlap - (hull_area - union) / hull_area


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - GIoU per box pair."""
    return 1.0 - giou(pred, target)


def varifocal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise VFL: BCE against the soft target q (the IoU for the true class, else 0);
    positives weighted by q, negatives by 0.75 * p^2 (p detached; VFL's alpha and gamma, as
    the assigner's cost has them)."""
    p = logits.sigmoid().detach()
    weight = torch.where(target > 0, target, 0.75 * p.pow(2))
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL [N, R+1] logits vs continuous targets [N] in [0, R): cross-entropy to the two
    neighbouring bins, weighted by closeness."""
    left = target.floor().long()
    weight_right = target - left.float()
    return F.cross_entropy(logits, left, reduction="none") * (1 - weight_right) + (
        F.cross_entropy(logits, left + 1, reduction="none") * weight_right
    )


def picodet_loss(
    cls_logits: list[torch.Tensor],
    reg_dists: list[torch.Tensor],
    targets: list[torch.Tensor],
    strides: list[int],
    cell_offset: float,
) -> dict[str, torch.Tensor]:
    """Per-level head outputs + per-image targets [K, 5] (label, x1, y1, x2, y2) in input
    pixels -> {"loss", "loss_vfl", "loss_giou", "loss_dfl"}."""
    shapes = [(c.shape[2], c.shape[3]) for c in cls_logits]
    logits = torch.cat([c.flatten(2).transpose(1, 2) for c in cls_logits], dim=1)
    reg = torch.cat([r.flatten(2).transpose(1, 2) for r in reg_dists], dim=1)
    points, point_strides = anchor_points(shapes, strides, cell_offset)
    points, point_strides = points.to(reg), point_strides.to(reg)
    boxes = decode_boxes(reg, points, point_strides)
    reg_max = reg.shape[-1] // 4 - 1

    cls_targets = torch.zeros_like(logits)
    pos_images, pos_anchors, pos_boxes = [], [], []
    for i, target in enumerate(targets):
        target = target.to(reg)
        assigned, _ = simota_assign(
            logits[i].detach().sigmoid(),
            boxes[i].detach(),
            points,
            point_strides,
            target[:, 1:],
            target[:, 0].long(),
        )
        anchors = torch.nonzero(assigned >= 0).squeeze(1)
        gt = target[assigned[anchors]]
        cls_targets[i, anchors, gt[:, 0].long()] = iou(boxes[i, anchors].detach(), gt[:, 1:])
        pos_images.append(torch.full_like(anchors, i))
        pos_anchors.append(anchors)
        pos_boxes.append(gt[:, 1:])
    images, anchors = torch.cat(pos_images), torch.cat(pos_anchors)
    gt_boxes = torch.cat(pos_boxes)
    num_pos = max(anchors.numel(), 1)
    loss_vfl = varifocal_loss(logits, cls_targets).sum() / num_pos

    if anchors.numel():
        score_weight = logits[images, anchors].detach().sigmoid().max(dim=1).values
        norm = score_weight.sum().clamp(min=1.0)  # as PaddleDetection's OTAVFLHead: early
        # scores are ~0.01, and a smaller norm would turn the box losses into a weighted mean
        loss_giou = (giou_loss(boxes[images, anchors], gt_boxes) * score_weight).sum() / norm
        anchor_xy = points[anchors].repeat(1, 2)
        side = (gt_boxes - anchor_xy) * torch.tensor([-1.0, -1.0, 1.0, 1.0]).to(reg)
        side = (side / point_strides[anchors, None]).clamp(0, reg_max - 0.01)
        dfl = distribution_focal_loss(
            reg[images, anchors].reshape(-1, reg_max + 1), side.reshape(-1)
        ).reshape(-1, 4)
        loss_dfl = (dfl.mean(dim=1) * score_weight).sum() / norm
    else:
        loss_giou = loss_dfl = reg.sum() * 0.0
    w_vfl, w_giou, w_dfl = LOSS_WEIGHTS
    loss = w_vfl * loss_vfl + w_giou * loss_giou + w_dfl * loss_dfl
    return {"loss": loss, "loss_vfl": loss_vfl, "loss_giou": loss_giou, "loss_dfl": loss_dfl}
