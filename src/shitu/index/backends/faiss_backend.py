"""Faiss backend: an in-memory index that each write changes in place, and an index file
that checkpoints it now and then.

SQLite holds the truth (rows and features). The index file (`index-<generation>-<random>.faiss`,
named and checksummed in the manifest, never changed once written) holds the vectors of
some earlier generation, and the manifest counts the rows added and removed since
(`changes_since_checkpoint`): opening the library loads the file and replays those from
SQLite (the ids the file lacks are added, with their stored features; the ids SQLite lacks
are removed). So a small write commits its rows and the count, and changes the live index
in place after the commit, in time proportional to the change; the file is written again
(under a new name, before the commit, so the committed manifest always names a complete
file) only when the changes since it exceed CHECKPOINT_FRACTION of the library, or when the
index is built again: on `rebuild`, a first add to an empty library, a trained type
switching from its exact fallback or retraining, and a removal from HNSW (which cannot
delete in place). Trained types (IVF, IVF-PQ) keep an exact Flat index until there is
enough data to train on, and retrain when the data grew or shrank 4x since the last
training.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np

from shitu.errors import GalleryError
from shitu.fileio import file_sha256, write_atomically, write_failure_reason
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
# A search of at most this much work (queries x vectors x dimensions; about a millisecond on
# one core) runs on the calling thread alone: waking Faiss's OpenMP threads for it cost more
# than they saved, 15-25 ms a search (of 8 photos against 81 images) in `shitu recognize` on a
# 2-core host, where the threads wait for the cores the model and decoding use.
SERIAL_SEARCH_WORK = 1 << 24
# The share of the library's rows that may be added or removed since the index file before a
# write checkpoints it again: opening then replays at most this many rows from SQLite.
CHECKPOINT_FRACTION = 0.1
CHANGES_KEY = "changes_since_checkpoint"


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
        # faiss's stubs type downcast_index as returning Index: it returns the IVF subclass
        ivf = cast(faiss.IndexIVF, faiss.downcast_index(faiss.extract_index_ivf(index)))
        if isinstance(ivf, faiss.IndexIVFPQ):
            # costly, and only polysemous search uses it (an attribute faiss's stubs lack)
            ivf.do_polysemous_training = False  # type: ignore[attr-defined]
        sample = min(count, max(TRAIN_POINTS_PER_LIST * ivf.nlist, MIN_TRAIN[index_type]))
        rows = np.random.default_rng(seed).choice(count, size=sample, replace=False)
        index.train(features[np.sort(rows)])
    index.add_with_ids(features, ids)
    return index


def indexed_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index holds, in no particular order (IDMap types keep them in a table,
    IVF types in their inverted lists)."""
    if isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    assert lists is not None  # an IVF index owns its inverted lists
    held = [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
        for i in range(ivf.nlist)
        if lists.list_size(i)
    ]
    return np.concatenate(held) if held else np.zeros(0, np.int64)


def apply_change(index: faiss.Index, change: Change) -> None:
    """`change`'s removals and additions, made to `index` in place."""
    if len(change.removed_ids):
        # faiss's Python wrapper takes an id array; its stubs list an IDSelector only
        index.remove_ids(change.removed_ids)  # type: ignore[arg-type]
    if len(change.added_ids):
        assert change.added is not None  # a Change gives the vectors of the ids it adds
        index.add_with_ids(change.added, change.added_ids)


@dataclass(frozen=True)
class _Staged:
    """What `publish` makes live: `index` (a new one, the live one, or None for an empty
    library), with `in_place` applied to it first where the write changes the live one."""

    index: faiss.Index | None
    in_place: Change | None = None


def apply_search_params(index: faiss.Index, index_type: str, options: dict[str, Any]) -> None:
    space = faiss.ParameterSpace()
    if index_type == "HNSW32":
        space.set_index_parameter(index, "efSearch", options.get("ef_search", DEFAULT_EF_SEARCH))
    elif index_type in MIN_TRAIN:
        nlist = faiss.extract_index_ivf(index).nlist
        space.set_index_parameter(index, "nprobe", options.get("nprobe", default_nprobe(nlist)))


def _write_refusal(exc: OSError | RuntimeError) -> str:
    """The system's reason for a refused write ("No space left on device"): an OSError's,
    or the one faiss puts in parentheses at the end of its message (after the C++ place)."""
    if isinstance(exc, OSError):
        return write_failure_reason(exc)
    reason = re.search(r"\(([^()]+)\)\s*$", str(exc))
    return reason[1] if reason else str(exc)


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
        self._staged: _Staged | None = None
        self._written: str | None = None  # the index file the write under way wrote
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
            if state.get(CHANGES_KEY):
                self._replay_since_checkpoint()

    def _replay_since_checkpoint(self) -> None:
        """Bring the loaded index file up to the rows committed since it was written (called
        under the read lock that keeps the manifest and the rows of one generation)."""
        assert self.index is not None  # just read from its file
        apply_change(self.index, self._unindexed_change())

    def _unindexed_change(self) -> Change:
        """What makes the index hold the stored rows: the ids it lacks (with their stored
        features) added, the ids SQLite lacks removed."""
        stored = self.store.ids()
        assert self.index is not None  # its callers have a loaded index
        held = indexed_ids(self.index)
        removed = np.setdiff1d(held, stored, assume_unique=True)
        added = np.setdiff1d(stored, held, assume_unique=True)  # ascending: as they were added
        features = self.store.features_with_ids(added, self.manifest.embedding_dim)
        return Change(added_ids=added, added=features, removed_ids=removed)

    def follow(self, manifest: Manifest) -> Callable[[], None] | None:
        """Other processes' writes that kept this index's file (so changed no stored
        feature, search setting or index type: those build a new one) are applied to the
        live index; after a new file, it is loaded."""
        state, ours = manifest.index_state, self.manifest.index_state
        if self.index is None or not state.get("file") or state.get("file") != ours.get("file"):
            return None
        change = self._unindexed_change()

        def catch_up() -> None:
            assert self.index is not None  # checked above, and no write runs in between
            apply_change(self.index, change)
            self.manifest = manifest

        return catch_up

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
        """Nothing is changed that searches use: the live index changes in `publish`."""
        self._written = None
        if not change.touches_vectors:
            self._staged = None
            return dict(self.manifest.index_state)
        self._remove_orphans()
        count = self.store.count()
        target = buildable_type(manifest.index_type, count)
        if count == 0:
            self._staged = _Staged(None)
            return {}
        changed = len(change.added_ids) + len(change.removed_ids)
        since = self.manifest.index_state.get(CHANGES_KEY, 0) + changed
        state = dict(self.manifest.index_state)
        if self.index is None or self._needs_rebuild(change, target, count):
            ids, features = self.store.features(manifest.embedding_dim)
            index = build_index(target, manifest.metric, features, ids)
            state = {"built_type": target, CHANGES_KEY: 0}
            if target in MIN_TRAIN:
                state["trained_on"] = count
            self._staged = _Staged(index)
        elif since <= CHECKPOINT_FRACTION * count:  # the index file stays
            self._staged = _Staged(self.index, in_place=change)
            return {**state, CHANGES_KEY: since}
        elif changed <= CHECKPOINT_FRACTION * count:
            # The live index as it is (searches only read it meanwhile), this write to replay
            index, state[CHANGES_KEY] = self.index, changed
            self._staged = _Staged(self.index, in_place=change)
        else:  # a large change: a copy with it (the live index keeps serving until publish)
            index, state[CHANGES_KEY] = faiss.clone_index(self.index), 0
            apply_change(index, change)
            self._staged = _Staged(index)
        return {**state, **self._checkpoint(index, manifest.generation)}

    def _checkpoint(self, index: faiss.Index, generation: int) -> dict[str, Any]:
        """Write `index` as this generation's index file; its manifest entries. The name is
        this write's alone (another writer may make the same generation after a rollback),
        so that `discard_staged` removes no other write's file."""
        name = f"index-{generation:08d}-{secrets.token_hex(4)}.faiss"

        def write(tmp: Path) -> None:
            faiss.write_index(index, str(tmp))
            crash_point("index-file-written")

        path = self.root / name
        try:
            write_atomically(path, write, durable=True)
        except (OSError, RuntimeError) as exc:  # faiss reports a refused write as RuntimeError
            raise GalleryError(
                f"{path}: cannot write the index file ({_write_refusal(exc)}); nothing was changed"
            ) from exc
        self._written = name
        return {"file": name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}

    def publish(self, manifest: Manifest) -> None:
        previous = self.manifest.index_state.get("file")
        self.manifest = manifest
        staged, self._staged, self._written = self._staged, None, None
        if staged is None:
            return
        index = staged.index
        if staged.in_place is not None:
            assert index is not None  # a change made in place is made to the live index
            apply_change(index, staged.in_place)
        if index is not None:
            apply_search_params(index, manifest.index_state["built_type"], manifest.backend_options)
        self.index = index
        current = manifest.index_state.get("file")
        if previous and previous != current:
            (self.root / previous).unlink(missing_ok=True)

    def discard_staged(self) -> None:
        """Remove the index file of a write that did not commit, unless the committed
        manifest names it after all (a write interrupted just after its commit)."""
        name, self._staged, self._written = self._written, None, None
        if name is None:
            return
        try:
            committed = self.store.read_manifest()
        except GalleryError:  # the next write's clean-up removes it
            return
        if committed is None or committed.index_state.get("file") != name:
            (self.root / name).unlink(missing_ok=True)

    def _remove_orphans(self) -> None:
        """Files left by writes killed before their commit (we hold the write lock here)."""
        keep = self.manifest.index_state.get("file")
        # index files of other generations, and temporary files of unfinished writes
        for path in [*self.root.glob("index-*.faiss"), *self.root.glob(".index-*.faiss.*")]:
            if path.name != keep:  # a rolled-back write's writer may remove its own first
                path.unlink(missing_ok=True)

    def search(self, queries: np.ndarray, k: int, newest_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(The index holds the loaded rows alone, none newer than `newest_id`.)"""
        index = self.index
        if index is None or index.ntotal == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full(
                (len(queries), k), -1, np.int64
            )
        if queries.size * index.ntotal <= SERIAL_SEARCH_WORK:  # queries x vectors x dims
            with _one_openmp_thread():
                raw, ids = index.search(queries, k)
        else:
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


@contextmanager
def _one_openmp_thread() -> Iterator[None]:
    """Faiss calls of this thread inside run on it alone. OpenMP keeps the thread count per
    thread, so the searches other threads run meanwhile keep theirs."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
