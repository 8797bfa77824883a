"""Detector post-processing in numpy: decoding of PaddleDetection's PicoDet outputs, and NMS.

Inference runs it on onnxruntime's outputs (and on our torch detector's, converted) without
loading torch; the model and its training loss decode in torch (`postprocess`), as their
gradients and ONNX graph need.

Boxes are decoded GFL style: each side's offset is the expectation of a softmax over
reg_max+1 bins, times the level's stride, measured from the cell centre
(`(index + cell_offset) * stride`). NMS is exact greedy NMS: a box is kept iff no kept,
higher-scored box of its group overlaps it by more than the threshold. Each box kept drops
the rest of its group that it overlaps, so the work grows with the boxes kept times the
candidates, and stops once a group has as many as can be output (`max_kept`). Equal scores
keep their input order.
"""

from __future__ import annotations

import numpy as np


def level_shapes(height: int, width: int, strides: list[int]) -> list[tuple[int, int]]:
    """Feature map sizes of a PicoDet at this input size (each stride-2 conv rounds up)."""
    return [(-(-height // s), -(-width // s)) for s in strides]


def cell_centres(
    shapes: list[tuple[int, int]], strides: list[int], cell_offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres in input pixels [N, 2] (x, y) and each cell's stride [N], level by level,
    float32 (also the model's and its loss's, through `postprocess.anchor_points`)."""
    points, level_strides = [], []
    for (h, w), stride in zip(shapes, strides, strict=True):
        ys = (np.arange(h, dtype=np.float32) + np.float32(cell_offset)) * np.float32(stride)
        xs = (np.arange(w, dtype=np.float32) + np.float32(cell_offset)) * np.float32(stride)
        grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
        points.append(np.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=1))
        level_strides.append(np.full(h * w, stride, np.float32))
    return np.concatenate(points), np.concatenate(level_strides)


def decode_distributions(reg: np.ndarray, points: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """[B, N, 4(R+1)] bin logits -> [B, N, 4] boxes (x1, y1, x2, y2) in input pixels."""
    logits = reg.reshape(*reg.shape[:-1], 4, -1)
    bins = np.exp(logits - logits.max(axis=-1, keepdims=True))
    bins /= bins.sum(axis=-1, keepdims=True)
    dist = (bins @ np.arange(bins.shape[-1], dtype=bins.dtype)) * strides[:, None]
    return np.concatenate([points - dist[..., :2], points + dist[..., 2:]], axis=-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [N, M] of xyxy boxes (boxes with negative extent have zero area)."""
    area_a = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)
    area_b = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / union.clip(min=1e-12), 0)


def _greedy_nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_kept: int | None
) -> np.ndarray:
    """The best `max_kept` (all if None) of the boxes greedy NMS keeps, best first: one IoU
    row per box kept, not a matrix of all candidates (a per-class NMS at score threshold 0
    has a thousand candidates in each of 80 classes)."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while len(order) and (max_kept is None or len(kept) < max_kept):
        best, order = order[0], order[1:]
        kept.append(int(best))
        order = order[~(box_iou(boxes[best : best + 1], boxes[order])[0] > iou_threshold)]
    return np.array(kept, dtype=np.int64)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    iou_threshold: float,
    max_kept: int | None = None,
) -> np.ndarray:
    """Indices kept by greedy NMS within each group, highest score first; `max_kept`: at
    most that many of each group, its best (a caller that outputs no more)."""
    kept = [
        members[_greedy_nms(boxes[members], scores[members], iou_threshold, max_kept)]
        for members in (np.flatnonzero(groups == g) for g in np.unique(groups))
    ]
    if not kept:
        return np.zeros(0, dtype=np.int64)
    index = np.concatenate(kept)
    return index[np.argsort(-scores[index], kind="stable")]


def multiclass_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    score_threshold: float = 0.025,
    iou_threshold: float = 0.6,
    nms_top_k: int = 1000,
    keep_top_k: int = 100,
    class_agnostic: bool = False,
) -> np.ndarray:
    """Boxes [N, 4] and class scores [N, C] -> detections [M, 6] (cls, score, x1, y1, x2, y2).

    Per class, the `nms_top_k` best boxes scoring at least `score_threshold` (a minimum, as
    PP-ShiTu's detector threshold) enter NMS; the survivors of all classes are sorted by
    score and cut to `keep_top_k`. In the class-agnostic mode each box competes once, with
    its best class and score.
    """
    if class_agnostic:
        labels = scores.argmax(axis=1)
        scores = scores.max(axis=1, keepdims=True)
    # Class by class, best first (equal scores in box order), each class cut to nms_top_k.
    by_class = scores.transpose()
    cand_classes, cand_index = np.nonzero(by_class >= score_threshold)
    cand_scores = scores[cand_index, cand_classes]
    order = np.lexsort((-cand_scores, cand_classes))
    cand_classes, cand_index, cand_scores = (
        cand_classes[order],
        cand_index[order],
        cand_scores[order],
    )
    rank = np.arange(len(order)) - np.searchsorted(cand_classes, cand_classes)
    top = rank < nms_top_k
    cand_classes, cand_index, cand_scores = cand_classes[top], cand_index[top], cand_scores[top]
    cand_boxes = boxes[cand_index]
    kept = nms(cand_boxes, cand_scores, cand_classes, iou_threshold, keep_top_k)[:keep_top_k]
    if class_agnostic:
        cand_classes = labels[cand_index]
    return np.concatenate(
        [
            cand_classes[kept, None].astype(boxes.dtype),
            cand_scores[kept, None],
            cand_boxes[kept],
        ],
        axis=1,
    )
