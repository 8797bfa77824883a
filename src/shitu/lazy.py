"""Package namespaces whose names load on first use (PEP 562 `__getattr__`).

`from shitu.pipeline import Recognizer` reads as it always has, but importing the package,
or a light module in it (`shitu.pipeline.defaults`, which the command line's options
show), loads none of the modules behind its names (torch, OpenCV, ...): `shitu --help`
and the commands that need no model start without them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, modules: dict[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for the `__init__` of `package`: each name listed under
    a module is imported from `package.module` when first read, then kept in the package."""
    homes = {name: f"{package}.{module}" for module, names in modules.items() for name in names}

    def load(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def names() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | homes.keys())

    return load, names
