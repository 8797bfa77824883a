"""Datasets, registered in `shitu.registry.DATASETS`."""

from shitu.registry import DATASETS, import_submodules

import_submodules(__name__)

from shitu.data.datasets.base import ImageDataset  # noqa: E402

__all__ = ["DATASETS", "ImageDataset"]
