"""What the library needs from an embedding model, so the core never imports the inference code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from shitu.progress import ImageProgress


class Extraction(Protocol):
    """Features of the images that could be read, in order, and why the others failed."""

    features: np.ndarray
    paths: list[str]
    failures: list[tuple[str, str]]


class Embedder(Protocol):
    """Satisfied by `shitu.inference.extractor.FeatureExtractor` and by test doubles. Its
    values are read-only properties: a type checker takes a plain attribute of a Protocol
    for one the library may set, which FeatureExtractor's read-only `preprocessing` is not."""

    @property
    def embedding_size(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def preprocessing(self) -> dict[str, Any]: ...

    def extract_files(
        self, paths: Sequence[str], batch_size: int = 32, progress: bool | ImageProgress = False
    ) -> Extraction:
        """Features of the readable files, in order, and the (path, reason) of the others.
        `progress`: draw a bar, or advance the one given."""
        ...
