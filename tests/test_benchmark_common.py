"""The benchmarks' shared set-up: features of a listed set, every file or none."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shitu.inference import FeatureExtractor, default_model_dir

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _common():
    spec = importlib.util.spec_from_file_location("common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_feature_refuses_a_set_with_an_unreadable_file(tmp_path: Path) -> None:
    """Labels are paired with features by position: a skipped gallery photo shifted every
    later label onto the next photo's features (detector_coverage.py, synthetic_signs.py)."""
    paths = []
    for seed in range(2):
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{seed}.png")
        Image.fromarray(pixels).save(paths[-1])
    every_feature = _common().every_feature
    with FeatureExtractor.load(default_model_dir(), num_threads=1) as extractor:
        assert every_feature(extractor, paths).shape == (2, extractor.embedding_size)
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"not a jpeg")
        with pytest.raises(
            SystemExit, match=rf"1 of 3 images could not be read \(the first: {broken}"
        ):
            every_feature(extractor, [paths[0], broken, paths[1]])
