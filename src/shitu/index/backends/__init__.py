"""Vector search backends behind one interface: Faiss (embedded files) and Milvus (a service).

The SQLite store is the source of truth (rows and features); a backend holds a derived,
searchable copy. A write calls `stage` inside the SQLite transaction (the backend's new
`index_state` is committed with the rows) and `publish` after the commit, which is where
the copy that searches use changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shitu.errors import GalleryError
from shitu.index.manifest import Manifest
from shitu.index.metadata import MetadataStore

EMPTY_IDS = np.zeros(0, dtype=np.int64)


class IndexSyncError(GalleryError):
    """`publish` failed: the index service (Milvus) did not apply a write that the library
    had committed. The rows are stored and the manifest still marks the service's copy
    stale, so the library builds it again from them when it next opens. `failure` says
    what failed, for a caller that words the rest itself (a build that is abandoned)."""

    def __init__(self, library: Path, failure: str) -> None:
        self.failure = failure
        super().__init__(
            f"{library}: {failure}; the library keeps the change (its rows are committed) "
            f"and builds the index again from them when it next opens, or now with "
            f"`shitu index rebuild {library}`"
        )


class IndexUnavailableError(GalleryError):
    """The index service (a Milvus server) failed a search or a count: gone, restarting,
    out of reach. Nothing was changed, and the same call may succeed once it is back."""


class UnsupportedIndexError(GalleryError):
    """An index type that the library's backend cannot build (Milvus Lite: IVFPQ): a
    choice to make again, refused before anything is written."""


@dataclass
class Change:
    """What one write did to the rows: their vectors, which the backend follows (relabels
    touch none), and their labels, which the library's ids and labels in memory follow."""

    added_ids: np.ndarray = field(default_factory=lambda: EMPTY_IDS)
    added: np.ndarray | None = None
    added_labels: Sequence[str] = ()  # as stored, one per added id
    removed_ids: np.ndarray = field(default_factory=lambda: EMPTY_IDS)
    relabelled_ids: np.ndarray = field(default_factory=lambda: EMPTY_IDS)
    relabelled_to: str = ""  # the label the relabelled ids now have
    rebuild: bool = False

    @property
    def touches_vectors(self) -> bool:
        return self.rebuild or len(self.added_ids) > 0 or len(self.removed_ids) > 0


def scores_from_distances(
    raw: np.ndarray, ids: np.ndarray, metric: str, normalized: bool
) -> np.ndarray:
    """Scores where higher always means more similar; padding (id -1) scores -inf.

    Inner product is already a similarity (the cosine for normalised features). L2 backends
    return squared distances d^2: between unit vectors they become the same cosine, 1 - d^2/2,
    so that a score (and a threshold on it) means the same for either metric; without
    normalisation, the negated Euclidean distance.
    """
    raw = raw.astype(np.float32, copy=False)
    if metric == "ip":
        scores = raw
    elif normalized:
        scores = 1.0 - raw / 2.0
    else:
        scores = -np.sqrt(np.maximum(raw, 0.0))
    return np.where(ids >= 0, scores, np.float32(-np.inf)).astype(np.float32, copy=False)


class Backend(ABC):
    """A searchable copy of the library's features, kept in step by the gallery's writes."""

    def __init__(self, root: Path, manifest: Manifest, store: MetadataStore) -> None:
        self.root = root
        self.manifest = manifest
        self.store = store

    @abstractmethod
    def stage(self, change: Change, manifest: Manifest) -> dict[str, Any]:
        """Prepare `change` (inside the write transaction); return the new `index_state`."""

    @abstractmethod
    def publish(self, manifest: Manifest) -> None:
        """Make the staged change live after the transaction committed `manifest`;
        a service that fails to raises IndexSyncError."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, newest_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores (higher is more similar, -inf padding) and ids (-1 padding), both [Q, k],
        of ids up to `newest_id`, the newest the library has loaded the label of: ids only
        grow, and a Milvus collection shows other processes' additions before then."""

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Number of vectors searchable now."""

    @abstractmethod
    def problems(self) -> list[str]:
        """Disagreements between this backend and the store (empty when healthy)."""

    @abstractmethod
    def close(self) -> None:
        """Release files and connections."""

    def follow(self, manifest: Manifest) -> Callable[[], None] | None:
        """Where this copy can catch up with the committed `manifest` (another process's
        writes) without loading it whole, the step that does, read under the caller's read
        lock and run with searches held off; None where it must be loaded again."""
        return None

    def discard(self) -> None:  # noqa: B027 (optional: most keep their index in the folder)
        """Delete what the index keeps outside the library's folder (a Milvus collection),
        for a library whose folder is being deleted."""

    def discard_staged(self) -> None:  # noqa: B027 (optional: most backends stage nothing on disk)
        """Drop what `stage` prepared for a write that did not commit (files it wrote)."""

    def finish_open(self) -> None:  # noqa: B027 (optional: most backends have nothing to do)
        """Writes that opening needs (e.g. recording a resync), done after the read lock of
        `Gallery.open` is released: SQLite cannot turn a read into a write."""

    # Whether a second instance may open before this one closes, so that a failed reload
    # keeps the old one serving (a Milvus Lite file has one server per process).
    opens_beside_itself: ClassVar[bool] = True
    # Why the index was left unloaded when opened with `repair` (then `Gallery.open`
    # rebuilds it from the stored features); None when it loaded.
    damaged: str | None = None


def describe_index(manifest: Manifest) -> dict[str, Any]:
    """Backend facts for `stats` (index kind, size), from the manifest alone: `index stats`
    reports them without loading the index."""
    facts = dict(manifest.index_state)
    if manifest.backend == "milvus":
        from shitu.index.backends.milvus_backend import collection_name

        facts["collection"] = collection_name(manifest)
    return facts


def open_backend(
    root: Path,
    manifest: Manifest,
    store: MetadataStore,
    verify: bool,
    repair: bool = False,
    replace_collection: bool = False,
) -> Backend:
    """repair: a damaged Faiss index file, or a Milvus collection that cannot be read
    (dropped), is left unloaded and named in `damaged` instead of refused (a Milvus
    collection merely out of step is re-synced from the stored features either way).
    replace_collection: a new library's Milvus collection that holds vectors (no library's
    any more) is dropped rather than refused as another library's, unless the library it
    records still uses it."""
    if manifest.backend == "milvus":
        from shitu.index.backends.milvus_backend import MilvusBackend

        return MilvusBackend(root, manifest, store, repair, replace_collection)
    from shitu.index.backends.faiss_backend import FaissBackend

    return FaissBackend(root, manifest, store, verify=verify, repair=repair)
