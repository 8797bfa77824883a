"""Faiss backend: one immutable index file per generation, named and checksummed in the manifest.

A write builds the next index (incrementally on a copy of the live one when the index type
allows, otherwise from the stored features; the live one keeps serving searches) and writes
it under a new name before the transaction commits, so the committed manifest always names
a complete file. Trained types (IVF, IVF-PQ) keep an exact Flat index until there is enough
data to train on, and retrain when the data grew or shrank 4x since the last training.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from shitu.errors import GalleryError
from shitu.fileio import file_sha256, write_atomically
from shitu.index.backends import Backend, Change, scores_from_distances
from shitu.index.files import crash_point
from shitu.index.manifest import Manifest
from shitu.index.metadata import MetadataStore

logger = logging.getLogger(__name__)

# Fewest vectors a trained type is built from: IVF wants >= 39 points per list; PQ trains
# 256 centroids per sub-quantizer, for which Faiss asks for 39 x 256 points.
MIN_TRAIN = {"IVF": 1_000, "IVFPQ": 39 * 256}
RETRAIN_FACTOR = 4
TRAIN_POINTS_PER_LIST = 64
DEFAULT_EF_SEARCH = 64


def nlist_for(count: int) -> int:
    """About sqrt(N) inverted lists, with >= 39 training points each."""
    return max(1, min(round(math.sqrt(count)), count // 39))


def pq_subquantizers(dim: int) -> int:
    """8 dimensions per PQ code byte when the dimension allows, else fewer."""
    for width in (8, 4, 2):
        if dim % width == 0:
            return dim // width
    return dim


def default_nprobe(nlist: int) -> int:
    return min(nlist, max(8, nlist // 16))


def factory_string(index_type: str, dim: int, count: int) -> str:
    if index_type == "Flat":
        return "IDMap2,Flat"
    if index_type == "HNSW32":
        return "IDMap2,HNSW32"
    if index_type == "IVF":
        return f"IVF{nlist_for(count)},Flat"
    return f"IVF{nlist_for(count)},PQ{pq_subquantizers(dim)}"


def buildable_type(index_type: str, count: int) -> str:
    """The type we can build now: a trained type falls back to exact Flat on too little data."""
    return "Flat" if count < MIN_TRAIN.get(index_type, 0) else index_type


def metric_code(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def build_index(
    index_type: str, metric: str, features: np.ndarray, ids: np.ndarray, seed: int = 0
) -> faiss.Index:
    """A Faiss index of `features` with our image ids; trained types train on a sample."""
    count, dim = features.shape
    index = faiss.index_factory(dim, factory_string(index_type, dim, count), metric_code(metric))
    if not index.is_trained:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            ivf.do_polysemous_training = False  # costly, and only polysemous search uses it
        sample = min(count, max(TRAIN_POINTS_PER_LIST * ivf.nlist, MIN_TRAIN[index_type]))
        rows = np.random.default_rng(seed).choice(count, size=sample, replace=False)
        index.train(features[np.sort(rows)])
    index.add_with_ids(features, ids)
    return index


def apply_search_params(index: faiss.Index, index_type: str, options: dict[str, Any]) -> None:
    space = faiss.ParameterSpace()
    if index_type == "HNSW32":
        space.set_index_parameter(index, "efSearch", options.get("ef_search", DEFAULT_EF_SEARCH))
    elif index_type in MIN_TRAIN:
        nlist = faiss.extract_index_ivf(index).nlist
        space.set_index_parameter(index, "nprobe", options.get("nprobe", default_nprobe(nlist)))


class FaissBackend(Backend):
    """An in-memory Faiss index loaded from the file the manifest names."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        store: MetadataStore,
        verify: bool = True,
        repair: bool = False,
    ) -> None:
        super().__init__(root, manifest, store)
        self.index: faiss.Index | None = None
        self._staged: tuple[faiss.Index | None, str | None] | None = None
        state = manifest.index_state
        if state.get("file"):
            path = root / state["file"]
            problem = self._file_problem(path, state, checksum=verify or repair)
            if problem and repair:
                logger.warning("%s; building it again from the stored features", problem)
                self.damaged = problem
                return
            if problem:
                raise GalleryError(
                    f"{problem}; `shitu index rebuild {root}` builds it again from the "
                    "stored features"
                )
            self.index = faiss.read_index(str(path))
            apply_search_params(self.index, state["built_type"], manifest.backend_options)

    @staticmethod
    def _file_problem(path: Path, state: dict[str, Any], checksum: bool) -> str | None:
        """Check before faiss reads the file: a truncated index can crash the process."""
        if not path.is_file():
            return f"{path}: index file is missing"
        if path.stat().st_size != state["bytes"]:
            size = path.stat().st_size
            return f"{path}: index file is {size} bytes, the manifest says {state['bytes']}"
        if checksum and file_sha256(path) != state["sha256"]:
            return f"{path}: index file checksum does not match the manifest (corrupt file)"
        return None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else self.index.ntotal

    def _needs_rebuild(self, change: Change, target: str, count: int) -> bool:
        state = self.manifest.index_state
        if change.rebuild or self.index is None or state.get("built_type") != target:
            return True
        if target in MIN_TRAIN:
            trained_on = state["trained_on"]
            if count >= RETRAIN_FACTOR * trained_on or RETRAIN_FACTOR * count <= trained_on:
                return True
        # HNSW cannot delete in place; the stored features make a rebuild cheap to express.
        return len(change.removed_ids) > 0 and target == "HNSW32"

    def stage(self, change: Change, manifest: Manifest) -> dict[str, Any]:
        if not change.touches_vectors:
            self._staged = None
            return dict(self.manifest.index_state)
        self._remove_orphans()
        count = self.store.count()
        target = buildable_type(manifest.index_type, count)
        if count == 0:
            self._staged = (None, None)
            return {}
        state: dict[str, Any] = {"built_type": target}
        if self._needs_rebuild(change, target, count):
            ids, features = self.store.features(manifest.embedding_dim)
            index = build_index(target, manifest.metric, features, ids)
            if target in MIN_TRAIN:
                state["trained_on"] = count
        else:  # a copy: searches in other threads use the live index until publish
            index = faiss.clone_index(self.index)
            if len(change.removed_ids):
                index.remove_ids(change.removed_ids)
            if len(change.added_ids):
                index.add_with_ids(change.added, change.added_ids)
            if "trained_on" in self.manifest.index_state:
                state["trained_on"] = self.manifest.index_state["trained_on"]
        name = f"index-{manifest.generation:08d}.faiss"

        def write(tmp: Path) -> None:
            faiss.write_index(index, str(tmp))
            crash_point("index-file-written")

        write_atomically(self.root / name, write, durable=True)
        self._staged = (index, name)
        path = self.root / name
        return {**state, "file": name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}

    def publish(self, manifest: Manifest) -> None:
        previous = self.manifest.index_state.get("file")
        self.manifest = manifest
        if self._staged is None:
            return
        index, current = self._staged
        self._staged = None
        if index is not None:
            apply_search_params(index, manifest.index_state["built_type"], manifest.backend_options)
        self.index = index
        if previous and previous != current:
            (self.root / previous).unlink(missing_ok=True)

    def _remove_orphans(self) -> None:
        """Files left by writes killed before their commit (we hold the write lock here)."""
        keep = self.manifest.index_state.get("file")
        # index files of other generations, and temporary files of unfinished writes
        for path in [*self.root.glob("index-*.faiss"), *self.root.glob(".index-*.faiss.*")]:
            if path.name != keep:
                path.unlink()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.index
        if index is None or index.ntotal == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full(
                (len(queries), k), -1, np.int64
            )
        raw, ids = index.search(queries, k)
        return scores_from_distances(raw, ids, self.manifest.metric, self.manifest.normalize), ids

    def close(self) -> None:
        self.index = None

    def problems(self) -> list[str]:
        state = self.manifest.index_state
        found = []
        if state.get("file"):
            problem = self._file_problem(self.root / state["file"], state, checksum=True)
            if problem:
                found.append(problem)
        count = self.store.count()
        if self.ntotal != count:
            found.append(f"faiss index holds {self.ntotal} vectors, library has {count} images")
        return found
