"""A weight-free mainbody detector for objects photographed on a plain background.

Checkout counters, turntables and product shots put items on a uniform surface: the
pixels that differ from the border's colour are the objects. This needs no model file,
so recognition of several objects works offline out of the box (the demo uses it).
Images whose border is not uniform give no boxes (the pipeline then uses the whole image).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from shitu.data.transforms.ops import check_rgb_image

BORDER = 4  # pixels of each edge that sample the background
MAX_BORDER_SPREAD = 18.0  # median absolute deviation (Lab units) of a uniform border
MIN_DIFFERENCE = 25.0  # Lab distance from the background that counts as object
MIN_AREA = 0.005  # smallest object, as a fraction of the image
# Most pixels the mask is found at: a 12-megapixel photo at full size took 5 s and over
# 400 MB (its Lab copy and distances in float32); boxes are scaled back to its pixels. A
# pixel count, not a longest side: a panorama keeps the height its objects need.
MAX_PIXELS = 1024 * 1024


class PlainBackgroundDetector:
    """Connected regions that differ from the border colour; same interface as Detector.

    Every region larger than MIN_AREA of the image counts, with score 1.0 (a small item
    beside a big one is as real as it), so `score_threshold` has no effect here.
    """

    def __repr__(self) -> str:
        return "PlainBackgroundDetector()"

    def detect(
        self, image: np.ndarray, score_threshold: float = 0.3, max_boxes: int = 5
    ) -> np.ndarray:
        """Boxes [M, 6] float32 (cls 0, score, x1, y1, x2, y2), largest first, for an RGB
        uint8 HxWx3 image (anything else: an UnreadableImageError naming it, as Detector's).
        A photo of more than MAX_PIXELS is searched in a copy of that many, its boxes exact
        to one pixel of that copy."""
        check_rgb_image(image)
        none = np.zeros((0, 6), np.float32)
        full_height, full_width = image.shape[:2]
        scale = min(1.0, math.sqrt(MAX_PIXELS / (full_height * full_width)))
        if scale < 1.0:
            size = (max(1, round(full_width * scale)), max(1, round(full_height * scale)))
            image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA)
        height, width = image.shape[:2]
        if min(height, width) <= 4 * BORDER or max_boxes < 1:
            return none
        lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB).astype(np.float32)
        border = np.concatenate(
            [
                lab[:BORDER].reshape(-1, 3),
                lab[-BORDER:].reshape(-1, 3),
                lab[:, :BORDER].reshape(-1, 3),
                lab[:, -BORDER:].reshape(-1, 3),
            ]
        )
        colour = np.median(border, axis=0)
        spread = np.median(np.abs(border - colour), axis=0).max()
        if spread > MAX_BORDER_SPREAD:
            return none
        distance = np.linalg.norm(lab - colour, axis=2)
        mask = (distance > MIN_DIFFERENCE + 3 * spread).astype(np.uint8)
        # Remove speckle, keep thin edges (they close an object's outline), bridge small gaps.
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)
        # Outer outlines only: a region's holes (parts coloured like the background) are its own.
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        areas = np.asarray([cv2.contourArea(c) for c in contours], np.float32)
        rects = np.asarray([cv2.boundingRect(c) for c in contours], np.float32).reshape(-1, 4)
        large = areas >= MIN_AREA * height * width
        if not large.any():
            return none
        areas, rects = areas[large], rects[large]
        order = np.argsort(-areas)[:max_boxes]
        x, y, w, h = rects[order].T
        x_scale, y_scale = full_width / width, full_height / height
        x1, y1, x2, y2 = x * x_scale, y * y_scale, (x + w) * x_scale, (y + h) * y_scale
        boxes = np.stack([np.zeros_like(x), np.ones_like(x), x1, y1, x2, y2], axis=1)
        return boxes.astype(np.float32)
