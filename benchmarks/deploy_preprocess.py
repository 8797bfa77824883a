"""PaddleClas's deployment preprocessing for recognition models, done the way its Python
deploy code does it (serially, OpenCV + numpy). Shared by both sides of
feature_extraction.py: imported in the Paddle venv and in ours."""

from __future__ import annotations

import cv2
import numpy as np

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def preprocess(path: str) -> np.ndarray:
    """BGR decode -> RGB -> cv2 bilinear resize to 224x224 -> (x/255 - mean)/std -> CHW."""
    image = cv2.imread(path)[:, :, ::-1]
    image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    image = (image.astype(np.float32) * np.float32(1 / 255) - MEAN) / STD
    return image.transpose(2, 0, 1)


def batch(paths: list[str]) -> np.ndarray:
    return np.ascontiguousarray(np.stack([preprocess(p) for p in paths]))
