"""Datasets, registered in `shitu.registry.DATASETS`."""

from shitu.registry import DATASETS, import_submodules

import_submodules(__name__)

__all__ = ["DATASETS"]
