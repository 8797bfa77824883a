"""SimOTA label assignment (YOLOX; PicoDet's defaults: centre radius 2.5 strides,
top-10 IoUs for the dynamic k, IoU cost weight 6).

Candidates are anchors whose point lies inside a ground-truth box or within the radius of
its centre. Cost = VFL classification cost + IOU_WEIGHT * -log(IoU), plus a huge penalty
unless the point is both inside the box and near its centre. Each ground truth takes its
k cheapest candidates, k = max(1, int(sum of its top IoUs)); an anchor claimed by
several ground truths keeps the cheapest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shitu.detection.postprocess import box_iou

OUTSIDE_COST = 1e8
CENTRE_RADIUS = 2.5  # strides
CANDIDATE_TOPK = 10
IOU_WEIGHT = 6.0


def _vfl_cost(probs: torch.Tensor, labels: torch.Tensor, ious: torch.Tensor) -> torch.Tensor:
    """[Nc, C] scores, [G] labels, [Nc, G] IoUs -> [Nc, G] VFL summed over classes, with the
    ground truth's class as positive (target = IoU) and every other class negative."""
    probs = probs.clamp(1e-6, 1 - 1e-6)
    negative = 0.75 * probs.pow(2) * -torch.log1p(-probs)  # VFL of each class with target 0
    p = probs[:, labels]  # [Nc, G]
    positive = ious * F.binary_cross_entropy(p, ious, reduction="none")
    return negative.sum(dim=1, keepdim=True) - negative[:, labels] + positive


def simota_assign(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [N, C] (sigmoid), predicted boxes [N, 4], anchor points [N, 2] and strides [N],
    ground truth [G, 4] + [G] -> per anchor the assigned ground-truth index (-1: background)
    and the IoU of its prediction with it."""
    n = scores.shape[0]
    assigned = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    assigned_iou = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    if gt_boxes.numel() == 0:
        return assigned, assigned_iou
    x, y = points[:, 0:1], points[:, 1:2]
    in_box = (
        (x > gt_boxes[:, 0]) & (x < gt_boxes[:, 2]) & (y > gt_boxes[:, 1]) & (y < gt_boxes[:, 3])
    )
    centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    radius = CENTRE_RADIUS * strides[:, None]
    in_centre = ((x - centre[:, 0]).abs() < radius) & ((y - centre[:, 1]).abs() < radius)
    candidates = torch.nonzero((in_box | in_centre).any(dim=1)).squeeze(1)
    if candidates.numel() == 0:
        return assigned, assigned_iou

    ious = box_iou(boxes[candidates], gt_boxes)  # [Nc, G]
    cost = (
        _vfl_cost(scores[candidates], gt_labels, ious)
        + IOU_WEIGHT * -torch.log(ious + 1e-8)
        + OUTSIDE_COST * ~(in_box[candidates] & in_centre[candidates])
    )
    top_ious = ious.topk(min(CANDIDATE_TOPK, len(candidates)), dim=0).values
    dynamic_k = top_ious.sum(dim=0).int().clamp(min=1)  # [G]
    order = cost.argsort(dim=0, stable=True)  # cheapest first, per ground truth
    rank = torch.empty_like(order).scatter_(
        0, order, torch.arange(len(candidates), device=cost.device)[:, None].expand_as(order)
    )
    matched = rank < dynamic_k[None, :]
    cost = torch.where(matched, cost, torch.full_like(cost, float("inf")))
    best_cost, best_gt = cost.min(dim=1)
    positive = torch.isfinite(best_cost)
    assigned[candidates[positive]] = best_gt[positive]
    assigned_iou[candidates[positive]] = ious[positive, best_gt[positive]]
    return assigned, assigned_iou
