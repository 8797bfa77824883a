"""shitu: general image recognition by detection, embedding and gallery search.

`import shitu` loads nothing else: `shitu.pipeline`, `shitu.index`, `shitu.inference` and
`shitu.detection` are imported when first read (`shitu.pipeline.Recognizer` works after a
plain `import shitu`), so `shitu --help` starts without torch, OpenCV or Faiss.
"""

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBPACKAGES = ("detection", "index", "inference", "pipeline")


def __getattr__(name: str) -> ModuleType:
    if name not in _SUBPACKAGES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")  # which also sets it on shitu


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
