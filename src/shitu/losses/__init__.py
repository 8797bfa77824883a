"""Training losses, registered in `shitu.registry.LOSSES`."""

from shitu.registry import LOSSES, import_submodules

import_submodules(__name__)

__all__ = ["LOSSES"]
