"""Transforms, registered in `shitu.registry.TRANSFORMS`; `build_transforms` makes a pipeline."""

from shitu.registry import TRANSFORMS, import_submodules

import_submodules(__name__)

from shitu.data.transforms.compose import Compose, build_transforms  # noqa: E402

__all__ = ["TRANSFORMS", "Compose", "build_transforms"]
