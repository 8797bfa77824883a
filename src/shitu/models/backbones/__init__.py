"""Backbones, registered in `shitu.registry.BACKBONES` by the module that defines them."""

from shitu.registry import BACKBONES, import_submodules

import_submodules(__name__)

__all__ = ["BACKBONES"]
