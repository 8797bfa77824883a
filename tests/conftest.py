"""Shared fixtures: real images from ../shared/datasets and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def grocery_root() -> Path:
    default = REPO_ROOT.parent / "shared" / "datasets" / "grocery_store"
    return Path(os.environ.get("SHITU_GROCERY_ROOT", default))


@pytest.fixture(scope="session")
def grocery() -> Path:
    root = grocery_root()
    if not (root / "val.txt").is_file():
        pytest.fail(
            f"Grocery Store dataset not found at {root}: tests need ../shared beside the "
            "repository (or SHITU_GROCERY_ROOT pointing at grocery_store/)"
        )
    return root


def load_images(root: Path, count: int, size: int = 224) -> np.ndarray:
    """`count` real val photos, resized and ImageNet-normalised, as float32 NCHW."""
    from PIL import Image

    lines = [line for line in (root / "val.txt").read_text().splitlines() if line.strip()]
    step = max(1, len(lines) // count)
    batch = []
    for line in lines[::step][:count]:
        path = root / line.split(",")[0].strip()
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
        pixels = (np.asarray(rgb, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        batch.append(pixels.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32)


@pytest.fixture(scope="session")
def real_images(grocery: Path) -> np.ndarray:
    return load_images(grocery, 8)


@pytest.fixture(scope="session")
def serving_library(tmp_path_factory):
    """The demo gallery library that the `shitu serve` tests copy for each server."""
    from tests.serving_helpers import demo_library

    return demo_library(tmp_path_factory.getbasetemp() / "serving-library")
