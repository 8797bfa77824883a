"""Set-up shared by the recognition benchmarks: which model to time, and a gallery to search.

Benchmarks run as scripts (`python benchmarks/NAME.py`), so they import this as `common`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shitu.config import load_config
from shitu.errors import CheckpointError
from shitu.index import Gallery
from shitu.inference import FeatureExtractor, default_model_dir, export_model
from shitu.inference.manifest import read_manifest


def grocery_root() -> Path:
    """The Grocery Store dataset: $SHITU_GROCERY_ROOT, as the tests read it, else
    ../shared/datasets/grocery_store beside the repository."""
    default = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "grocery_store"
    return Path(os.environ.get("SHITU_GROCERY_ROOT", default))


def model_dir(given: str | None, tmp: Path) -> Path:
    """The model folder given, else the shipped default model, else PP-LCNetV2 base exported
    with random weights into `tmp` (speed does not depend on the weights)."""
    if given:
        return Path(given)
    try:
        return default_model_dir()
    except CheckpointError:
        config = load_config("GeneralRecognitionV2_PPLCNetV2_base", ["Arch.Head=null"])
        return export_model(config, None, tmp / "model")


def export_folders(given: list[str] | None) -> list[Path]:
    """The export folders of a repeatable --model, else the shipped model's, each checked
    before any work: a mistyped one was refused only after the models before it had run
    (minutes), or after the photos were drawn."""
    models = [Path(model) for model in given or [default_model_dir()]]
    for model in models:
        read_manifest(model)
    return models


def random_gallery(path: Path, extractor: FeatureExtractor, size: int) -> Path:
    """A library of `size` random vectors in 500 labels: search cost depends only on size."""
    vectors = np.random.default_rng(0).normal(size=(size, extractor.embedding_size))
    with Gallery.create(
        path, embedding_dim=extractor.embedding_size, model_fingerprint=extractor.fingerprint
    ) as gallery:
        gallery.add(vectors.astype(np.float32), [f"item {i % 500}" for i in range(size)])
    return path


def every_feature(
    extractor: FeatureExtractor, paths: Sequence[Path], progress: bool = False
) -> np.ndarray:
    """Features of every file, in order; exits naming the first unreadable one. Labels are
    listed by position, so features with a file skipped would pair every later label with
    the next file's features and print a wrong number."""
    result = extractor.extract_files(paths, progress=progress)
    if result.failures:
        path, reason = result.failures[0]
        sys.exit(
            f"{len(result.failures)} of {len(paths)} images could not be read (the first: "
            f"{path}: {reason}); the benchmark needs every one"
        )
    return result.features
