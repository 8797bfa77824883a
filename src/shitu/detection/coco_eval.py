"""COCO-style box AP: mAP@[.5:.95] and AP50, computed the way pycocotools does for
area "all" (101-point interpolated precision, at most 100 detections per image and class,
each detection matched greedily in score order to the best-overlapping unmatched ground truth
of its class). Crowd regions and area ranges are not modelled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shitu.detection.boxes import box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _average_precision(tp: np.ndarray, num_gt: int) -> float:
    """tp [D] (in descending score order) -> 101-point interpolated AP."""
    if len(tp) == 0:
        return 0.0
    tps = np.cumsum(tp)
    recall = tps / num_gt
    precision = tps / np.arange(1, len(tp) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # envelope from the right
    index = np.searchsorted(recall, RECALL_POINTS, side="left")
    return float(np.where(index < len(tp), precision[np.minimum(index, len(tp) - 1)], 0.0).mean())


def evaluate_boxes(
    detections: Sequence[np.ndarray],
    ground_truths: Sequence[tuple[np.ndarray, np.ndarray]],
    max_detections: int = 100,
) -> dict[str, float]:
    """Per image detections [M, 6] (cls, score, x1, y1, x2, y2) and ground truth (boxes [K, 4],
    labels [K]) -> {"mAP": AP@[.5:.95], "AP50": AP@.5}, averaged over classes with ground truth.
    An image's `max_detections` best boxes of each class count (pycocotools' maxDets)."""
    classes = sorted({int(c) for _, labels in ground_truths for c in labels})
    per_class = np.zeros((len(classes), len(IOU_THRESHOLDS)))
    for ci, cls in enumerate(classes):
        scores, tps = [], []
        num_gt = 0
        for dets, (gt_boxes, gt_labels) in zip(detections, ground_truths, strict=True):
            dets = np.asarray(dets, np.float64).reshape(-1, 6)
            dets = dets[dets[:, 0] == cls]  # then its best: pycocotools' maxDets is per class
            dets = dets[np.argsort(-dets[:, 1], kind="stable")][:max_detections]
            gts = np.asarray(gt_boxes, np.float64).reshape(-1, 4)[np.asarray(gt_labels) == cls]
            num_gt += len(gts)
            ious = box_iou(dets[:, 2:], gts)
            tp = np.zeros((len(dets), len(IOU_THRESHOLDS)))
            for ti, threshold in enumerate(IOU_THRESHOLDS):
                free = np.ones(len(gts), bool)
                for d in range(len(dets)):
                    candidates = np.where(free & (ious[d] >= threshold), ious[d], -1.0)
                    if len(gts) and candidates.max() >= 0:
                        best = int(candidates.argmax())
                        free[best] = False
                        tp[d, ti] = 1
            scores.append(dets[:, 1])
            tps.append(tp)
        order = np.argsort(-np.concatenate(scores), kind="stable")
        all_tp = np.concatenate(tps)[order]
        per_class[ci] = [
            _average_precision(all_tp[:, t], num_gt) for t in range(len(IOU_THRESHOLDS))
        ]
    if not classes:
        return {"mAP": 0.0, "AP50": 0.0}
    return {"mAP": float(per_class.mean()), "AP50": float(per_class[:, 0].mean())}
