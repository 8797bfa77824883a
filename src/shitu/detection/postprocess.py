"""Decoding of PicoDet head outputs and multi-class NMS, vectorised in torch.

Boxes are decoded GFL style: each side's offset is the expectation of a softmax over
reg_max+1 bins, times the level's stride, measured from the cell centre
(`(index + cell_offset) * stride`). NMS is exact greedy NMS computed with matrix
operations: a box is kept iff no kept, higher-scored box of its class overlaps it by
more than the threshold; that fixed point is reached by iterating the rule on all
boxes of a class at once, which needs as many rounds as the longest suppression chain.
"""

from __future__ import annotations

import torch


def anchor_points(
    shapes: list[tuple[int, int]], strides: list[int], cell_offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres in input pixels [N, 2] (x, y) and each cell's stride [N], level by level."""
    points, level_strides = [], []
    for (h, w), stride in zip(shapes, strides, strict=True):
        ys = (torch.arange(h, dtype=torch.float32) + cell_offset) * stride
        xs = (torch.arange(w, dtype=torch.float32) + cell_offset) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
        level_strides.append(torch.full((h * w,), float(stride)))
    return torch.cat(points), torch.cat(level_strides)


def level_shapes(height: int, width: int, strides: list[int]) -> list[tuple[int, int]]:
    """Feature map sizes of a PicoDet at this input size (each stride-2 conv rounds up)."""
    return [(-(-height // s), -(-width // s)) for s in strides]


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


def _greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    n = order.numel()
    earlier = torch.ones(n, n, dtype=torch.bool, device=boxes.device).tril(-1)
    suppresses = (box_iou(boxes, boxes) > iou_threshold) & earlier
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for _ in range(n):
        updated = ~(suppresses & keep[None, :]).any(dim=1)
        if torch.equal(updated, keep):
            break
        keep = updated
    return order[keep]


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Indices kept by greedy NMS within each group, highest score first."""
    kept = [
        members[_greedy_nms(boxes[members], scores[members], iou_threshold)]
        for members in (torch.nonzero(groups == g).squeeze(1) for g in groups.unique())
    ]
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    index = torch.cat(kept)
    return index[scores[index].argsort(descending=True, stable=True)]


def multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_threshold: float = 0.025,
    iou_threshold: float = 0.6,
    nms_top_k: int = 1000,
    keep_top_k: int = 100,
    class_agnostic: bool = False,
) -> torch.Tensor:
    """Boxes [N, 4] and class scores [N, C] -> detections [M, 6] (cls, score, x1, y1, x2, y2).

    Per class, the `nms_top_k` best boxes scoring at least `score_threshold` (a minimum, as
    PP-ShiTu's detector threshold) enter NMS; the survivors of all classes are sorted by
    score and cut to `keep_top_k`. In the class-agnostic mode each box competes once, with
    its best class and score.
    """
    if class_agnostic:
        best, labels = scores.max(dim=1)
        scores = best[:, None]
    k = min(nms_top_k, scores.shape[0])
    top_scores, top_index = scores.t().topk(k, dim=1)
    classes = torch.arange(scores.shape[1], device=scores.device)[:, None].expand(-1, k)
    mask = top_scores >= score_threshold
    cand_scores, cand_index, cand_classes = top_scores[mask], top_index[mask], classes[mask]
    cand_boxes = boxes[cand_index]
    kept = nms(cand_boxes, cand_scores, cand_classes, iou_threshold)[:keep_top_k]
    if class_agnostic:
        cand_classes = labels[cand_index]
    return torch.cat(
        [
            cand_classes[kept, None].to(boxes.dtype),
            cand_scores[kept, None],
            cand_boxes[kept],
        ],
        dim=1,
    )
