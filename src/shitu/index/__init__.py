"""Gallery library: persistent, incremental, crash-safe labelled features with vector search."""

from shitu.index.embedder import Embedder, Extraction
from shitu.index.gallery import (
    AddReport,
    Catalog,
    FilesToAdd,
    Gallery,
    NothingAddedError,
    SearchResult,
)
from shitu.index.labels import GalleryItem, collect_items
from shitu.index.manifest import INDEX_TYPES, METRICS, Manifest

__all__ = [
    "INDEX_TYPES",
    "METRICS",
    "AddReport",
    "Catalog",
    "Embedder",
    "Extraction",
    "FilesToAdd",
    "Gallery",
    "GalleryItem",
    "Manifest",
    "NothingAddedError",
    "SearchResult",
    "collect_items",
]
