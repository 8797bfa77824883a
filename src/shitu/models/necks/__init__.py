"""Necks (between backbone and head), registered in `shitu.registry.NECKS`."""

from shitu.registry import NECKS, import_submodules

import_submodules(__name__)

__all__ = ["NECKS"]
