"""Samplers, registered in `shitu.registry.SAMPLERS`."""

from shitu.registry import SAMPLERS, import_submodules

import_submodules(__name__)

__all__ = ["SAMPLERS"]
