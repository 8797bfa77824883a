"""COCO-style box AP: mAP@[.5:.95] and AP50, computed the way pycocotools does for
area "all" (101-point interpolated precision, at most 100 detections per image and class,
each detection matched greedily in score order to the best-overlapping unmatched ground truth
of its class). Crowd regions are ignored as pycocotools ignores them: a detection that
matches no ground truth but lies in a crowd region of its class (its intersection with
the region at least the IoU threshold times its own area) counts neither as right nor as
wrong. Pascal VOC's `difficult` boxes are ignored as the VOC protocol (and PaddleDetection's
VOC metric) ignores them: they do not count towards recall, and a detection that matches no
other ground truth but overlaps a difficult box of its class by the IoU threshold counts
neither as right nor as wrong (however many detections do: VOC never counts a detection of
a difficult object as a false positive). Area ranges are not modelled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shitu.detection.boxes import box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100  # per image and class: pycocotools' maxDets


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


def _in_crowd(dets: np.ndarray, crowd_boxes: np.ndarray) -> np.ndarray:
    """[D, R] share of each detection's area inside each crowd region (pycocotools' IoU
    for a crowd ground truth)."""
    lt = np.maximum(dets[:, None, :2], crowd_boxes[None, :, :2])
    rb = np.minimum(dets[:, None, 2:], crowd_boxes[None, :, 2:])
    inter = (rb - lt).clip(min=0).prod(axis=2)
    area = (dets[:, 2] - dets[:, 0]).clip(min=0) * (dets[:, 3] - dets[:, 1]).clip(min=0)
    return np.where(area[:, None] > 0, inter / area.clip(min=1e-12)[:, None], 0.0)


def evaluate_boxes(
    detections: Sequence[np.ndarray],
    ground_truths: Sequence[tuple[np.ndarray, np.ndarray]],
    crowds: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    difficult: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Per image detections [M, 6] (cls, score, x1, y1, x2, y2) and ground truth (boxes [K, 4],
    labels [K]) -> {"mAP": AP@[.5:.95], "AP50": AP@.5}, averaged over classes with ground truth
    that is not difficult. An image's MAX_DETECTIONS best boxes of each class count
    (pycocotools' maxDets); `crowds` gives each image's crowd regions (boxes, labels), where
    detections are ignored; `difficult` each image's [K] mask of its difficult boxes."""
    crowds = crowds if crowds is not None else [(np.zeros((0, 4)), np.zeros(0))] * len(detections)
    if difficult is None:
        difficult = [np.zeros(len(labels), bool) for _, labels in ground_truths]
    classes = sorted(
        {
            int(c)
            for (_, labels), hard in zip(ground_truths, difficult, strict=True)
            for c in np.asarray(labels)[~np.asarray(hard, bool)]
        }
    )
    per_class = np.zeros((len(classes), len(IOU_THRESHOLDS)))
    for ci, cls in enumerate(classes):
        scores, outcomes = [], []
        num_gt = 0
        for dets, (gt_boxes, gt_labels), (crowd_boxes, crowd_labels), hard in zip(
            detections, ground_truths, crowds, difficult, strict=True
        ):
            dets = np.asarray(dets, np.float64).reshape(-1, 6)
            dets = dets[dets[:, 0] == cls]  # then its best: pycocotools' maxDets is per class
            dets = dets[np.argsort(-dets[:, 1], kind="stable")][:MAX_DETECTIONS]
            of_class = np.asarray(gt_labels) == cls
            hard = np.asarray(hard, bool)
            all_gts = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
            gts, hard_gts = all_gts[of_class & ~hard], all_gts[of_class & hard]
            regions = np.asarray(crowd_boxes, np.float64).reshape(-1, 4)
            regions = regions[np.asarray(crowd_labels) == cls]
            num_gt += len(gts)
            ious = box_iou(dets[:, 2:], gts)
            # how far each detection overlaps what it may land on unpunished
            excused = np.maximum(
                _in_crowd(dets[:, 2:], regions).max(axis=1, initial=0.0),
                box_iou(dets[:, 2:], hard_gts).max(axis=1, initial=0.0),
            )
            # per detection and threshold: 1 right, 0 wrong, -1 ignored (in a crowd region,
            # or on a difficult box)
            outcome = np.zeros((len(dets), len(IOU_THRESHOLDS)))
            for ti, threshold in enumerate(IOU_THRESHOLDS):
                free = np.ones(len(gts), bool)
                for d in range(len(dets)):
                    candidates = np.where(free & (ious[d] >= threshold), ious[d], -1.0)
                    if len(gts) and candidates.max() >= 0:
                        best = int(candidates.argmax())
                        free[best] = False
                        outcome[d, ti] = 1
                    elif excused[d] >= threshold:
                        outcome[d, ti] = -1
            scores.append(dets[:, 1])
            outcomes.append(outcome)
        order = np.argsort(-np.concatenate(scores), kind="stable")
        all_outcomes = np.concatenate(outcomes)[order]
        per_class[ci] = [
            _average_precision(column[column >= 0], num_gt) for column in all_outcomes.T
        ]
    if not classes:
        return {"mAP": 0.0, "AP50": 0.0}
    return {"mAP": float(per_class.mean()), "AP50": float(per_class[:, 0].mean())}
