"""Shared fixtures: real images from ../shared/datasets and tiny configs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Tests press Ctrl-C in the commands they start (SIGINT to the child process), and a child
# inherits an ignored SIGINT: a shell script gives one to every job it starts in the
# background (`bash .ci/run &`), where those tests would fail. Python's own handler is
# taken back before any test runs.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
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


RESIZE_SHORT_CONFIG = """
Global: {{image_shape: [3, {size}, {size}]}}
Arch:
  name: RecModel
  Backbone: {{name: PPLCNetV2_small_ShiTu}}
  BackboneStopLayer: {{name: flatten}}
DataLoader:
  Eval:
    Query:
      dataset:
        name: ImageNetDataset
        image_root: {root}
        cls_label_path: {root}/unused.txt
        transform_ops:
          - DecodeImage: {{to_rgb: true, channel_first: false}}
          - ResizeImage: {{resize_short: {size}}}
          - CropImage: {{size: {size}}}
          - NormalizeImage: {{}}
"""


@pytest.fixture(scope="session")
def resize_short_library(tmp_path_factory) -> dict[str, Path]:
    """A tiny export that resizes the short side, then crops (as xbm_resnet50; the shipped
    model resizes to a fixed size), and a library of generated 32x32 images embedded with
    it: `model`, `gallery`, and its `images` folder."""
    from shitu.config import load_config
    from shitu.index import Gallery, GalleryItem
    from shitu.inference import FeatureExtractor, export_model
    from tests.index_helpers import make_images

    work = tmp_path_factory.mktemp("resize-short")
    config_file = work / "tiny.yaml"
    config_file.write_text(RESIZE_SHORT_CONFIG.format(size=32, root=work))
    model = export_model(load_config(config_file), None, work / "model")
    images = make_images(work / "images", 4)
    extractor = FeatureExtractor.load(model, num_threads=1)
    with Gallery.create_for(work / "gallery", extractor) as gallery:
        gallery.add_files(extractor, [GalleryItem(p, f"block {p.stem}") for p in images])
    return {"model": model, "gallery": work / "gallery", "images": work / "images"}


@pytest.fixture
def thin_limit(monkeypatch) -> int:
    """The pixel limit (SHITU_MAX_MEGAPIXELS) lowered to 50,000 pixels, so a resize_short of
    32 refuses an image as thin as 2x400 (32x6400 pixels) and thin cases stay cheap."""
    monkeypatch.setenv("SHITU_MAX_MEGAPIXELS", "0.05")
    return 50_000


@pytest.fixture
def latin1_folder(tmp_path: Path) -> Path:
    """An empty folder named `modèle` in Latin-1, as old archives and Windows shares name
    it (Python gives its bytes as lone surrogates); skipped on a file system that takes
    UTF-8 names only."""
    folder = tmp_path / os.fsdecode(b"mod\xe8le")
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes UTF-8 names only")
    return folder
