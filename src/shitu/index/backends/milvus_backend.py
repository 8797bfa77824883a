"""Milvus backend: the library's vectors in a Milvus collection (Milvus Lite file or a server).

Milvus cannot join the SQLite transaction, so the manifest records the generation the
collection was last synced to. A write commits the rows first (collection now stale), then
applies its change to Milvus and records the new synced generation; a library opened with a
stale collection (a write was killed in between) re-syncs it from the stored features.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import GalleryError
from shitu.fileio import staging_in_progress, staging_target
from shitu.index.backends import (
    Backend,
    Change,
    IndexSyncError,
    IndexUnavailableError,
    UnsupportedIndexError,
    scores_from_distances,
)
from shitu.index.manifest import Manifest
from shitu.index.metadata import LIBRARY_FILE, LibraryBusyError, MetadataStore

logger = logging.getLogger(__name__)

DEFAULT_URI = "milvus.db"
DEFAULT_COLLECTION = "shitu_gallery"
TOKEN_ENV = "SHITU_MILVUS_TOKEN"
INSERT_BATCH = 5_000  # rows per insert request, at most
# Bytes of vectors per insert request, at most: Milvus refuses larger requests (a server's
# gRPC limit, 64 MB by default in some versions; Milvus Lite's 256 MB), which 5,000 rows
# pass from about 3,300 dimensions on.
INSERT_BYTES = 32 << 20
# Queries per search request, at most: a server refuses more (its nq limit).
SEARCH_BATCH = 16_384
# Bytes of query vectors and their hits per search request, at most: the same limit refuses
# a larger request or answer (Milvus Lite failed 2,100 queries of 32,768 dimensions).
SEARCH_BYTES = 32 << 20
LIMIT_MAX = 16_384  # hits per query, at most: a server refuses a search for more
DEFAULT_NLIST = 1024
# Every read sees every committed write: pymilvus's default ("Bounded") lets a server answer
# from a view seconds old, so `verify` straight after a build counted too few vectors and a
# search missed images just added. Milvus Lite is always strong; a server needs asking.
CONSISTENCY = "Strong"
# Open backends per Milvus Lite file: this process serves each file from one server, which
# the last of them to close stops (stopped earlier, it fails the others' calls).
_lite_users: Counter[str] = Counter()
_lite_users_lock = threading.Lock()
# The collection property that records the folder of the library it was made for: a build
# told to replace a collection that holds vectors can then tell one that library still uses
# from one it left behind (deleted, or killed outright while building).
OWNER_PROPERTY = "shitu.library"


def index_params(index_type: str, dim: int, options: dict[str, Any]) -> tuple[str, dict]:
    nlist = options.get("nlist", DEFAULT_NLIST)
    if index_type == "Flat":
        return "FLAT", {}
    if index_type == "HNSW32":
        return "HNSW", {"M": 32, "efConstruction": 40}
    if index_type == "IVF":
        return "IVF_FLAT", {"nlist": nlist}
    from shitu.index.backends.faiss_backend import pq_subquantizers

    return "IVF_PQ", {"nlist": nlist, "m": pq_subquantizers(dim), "nbits": 8}


def collection_name(manifest: Manifest) -> str:
    return manifest.backend_options.get("collection", DEFAULT_COLLECTION)


def _service_failures() -> tuple[type[Exception], ...]:
    """What pymilvus raises when Milvus fails a call (the server gone, its storage full):
    its own errors, and the gRPC errors it passes on as they are."""
    import grpc
    from pymilvus.exceptions import MilvusException

    return MilvusException, grpc.RpcError


def _failure_reason(exc: Exception) -> str:
    """Why Milvus failed, without the class and code that its exceptions print around it."""
    message = getattr(exc, "message", None)  # MilvusException
    details = getattr(exc, "details", None)  # a failed gRPC call
    return str(message or (details() if callable(details) else exc))


def _not_a_raised_failure(record: logging.LogRecord) -> bool:
    """pymilvus logs every failed call with its traceback, by a stderr handler of its own, and
    raises it too: the log only repeats what the caller is told (this backend, in one line)."""
    return record.funcName != "_log_rpc_error"


logging.getLogger("pymilvus.decorators").addFilter(_not_a_raised_failure)


@contextmanager
def _lite_start_failures() -> Iterator[list[BaseException]]:
    """Why Milvus Lite could not serve a file: it logs that, with a traceback, and pymilvus
    raises only 'Open local milvus failed'. The logged exceptions are collected instead."""
    caught: list[BaseException] = []

    def collect(record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            caught.append(record.exc_info[1])
            return False
        return True

    lite_logger = logging.getLogger("milvus_lite.server_manager")
    lite_logger.addFilter(collect)
    try:
        yield caught
    finally:
        lite_logger.removeFilter(collect)


def _held_elsewhere(lite_failure: BaseException | None, exc: Exception) -> bool:
    """Whether Milvus Lite failed to start because another process serves its file, or may
    have: it logged no reason, and pymilvus gave only its own (an older Milvus Lite)."""
    if lite_failure is not None:
        return type(lite_failure).__name__ == "DataDirLockedError"
    return _failure_reason(exc) == "Open local milvus failed"


def _request_slices(count: int, row_bytes: int, max_rows: int, max_bytes: int) -> Iterator[slice]:
    """Rows 0..count in order, as slices of at most max_rows rows and max_bytes bytes (one row
    at least): Milvus refuses a request, or an answer, over its size limits."""
    size = max(1, min(max_rows, max_bytes // row_bytes))
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def _uses_collection(folder: Path, collection: str) -> bool:
    """Whether `folder` holds a library whose vectors are the Milvus collection of that
    name; one whose manifest cannot be read (locked, damaged, a newer shitu's) is taken to:
    its vectors are not dropped on a guess."""
    database = folder / LIBRARY_FILE
    if not database.is_file():
        return False
    try:
        store = MetadataStore(database)
        try:
            manifest = store.read_manifest()
        finally:
            store.close()
    except (GalleryError, sqlite3.Error):
        return True
    return (
        manifest is not None
        and manifest.backend == "milvus"
        and collection_name(manifest) == collection
    )


def search_params(index_type: str, k: int, options: dict[str, Any]) -> dict[str, Any]:
    if index_type == "HNSW32":
        return {"ef": max(k, options.get("ef_search", 64))}
    if index_type in ("IVF", "IVFPQ"):
        return {"nprobe": options.get("nprobe", 16)}
    return {}


class MilvusBackend(Backend):
    """Searches a Milvus collection holding (id, vector) rows; labels stay in SQLite."""

    opens_beside_itself = False

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        store: MetadataStore,
        repair: bool = False,
        replace_collection: bool = False,
    ) -> None:
        super().__init__(root, manifest, store)
        options = manifest.backend_options
        uri = options.get("uri", DEFAULT_URI)
        self._lite_path: str | None = None
        if "://" not in uri:  # a Milvus Lite file (must end in .db), kept inside the library
            uri = self._lite_path = str((root / uri).resolve())
        try:
            from pymilvus import MilvusClient

            if self._lite_path:
                import milvus_lite  # noqa: F401 (pymilvus imports it only as it connects)
        except ImportError as exc:
            raise GalleryError(
                "the milvus backend needs pymilvus (and milvus-lite for local files): "
                "pip install 'shitu[milvus]'"
            ) from exc
        self.collection = collection_name(manifest)
        self._pending: Change | None = None
        self._resynced: Manifest | None = None  # recorded by finish_open
        self._closed = False
        # A Lite file's server is started (or reused) and counted as one step, as a close
        # counts down and stops it: neither can come between the other's two.
        counting = _lite_users_lock if self._lite_path else nullcontext()
        try:
            with counting, _lite_start_failures() as lite_failures:
                self.client = MilvusClient(uri, token=os.environ.get(TOKEN_ENV, ""))
                if self._lite_path:
                    _lite_users[self._lite_path] += 1
        except Exception as exc:
            lite_failure = lite_failures[-1] if lite_failures else None
            reason = f"cannot connect to Milvus at {uri}: {lite_failure or _failure_reason(exc)}"
            if self._lite_path and _held_elsewhere(lite_failure, exc):
                raise LibraryBusyError(
                    f"{reason}; is the library open in another process, such as `shitu "
                    "serve`? A Milvus Lite file is open in one process at a time"
                ) from exc
            raise GalleryError(reason) from exc
        try:
            self._open_collection(uri, repair, replace_collection)
        except BaseException:
            self.close()  # else a Milvus Lite server keeps serving the file in this process
            raise

    def _open_collection(self, uri: str, repair: bool, replace: bool) -> None:
        """The collection, synced with the stored features, and loaded for searching; one
        that Milvus cannot read is refused, or with `repair` dropped and left `damaged`."""
        manifest = self.manifest
        with self._reading("looking into"):  # pymilvus's exception, a traceback, otherwise
            taken = manifest.generation == 0 and self._holds_rows()
        if taken:
            # A new library (every write makes a generation): the vectors are another
            # library's, which a sync would drop (an empty collection, say a failed build's
            # on a server, is taken over). A library deleted since, or a build killed
            # outright, leaves them to no library: `replace` says so, unless the library
            # recorded in the collection still uses it.
            owner = self._library_using_collection()
            if owner is not None:
                raise GalleryError(
                    f"Milvus collection '{self.collection}' at {uri} holds the vectors of "
                    f"the library {owner}, which uses it; choose another collection "
                    "(`collection`, --milvus-collection in the CLI), or delete that library "
                    "first: a collection that a library uses is not replaced"
                )
            if not replace:
                raise GalleryError(
                    f"Milvus collection '{self.collection}' at {uri} already holds vectors "
                    "(another library's?); choose another collection (`collection`, "
                    "--milvus-collection in the CLI), or, where no library uses it any more "
                    "(its library was deleted, or a build was killed), drop its vectors: "
                    "`replace_collection=True` (--replace-collection in the CLI)"
                )
            logger.warning(
                "dropping the vectors in Milvus collection '%s' at %s (--replace-collection)",
                self.collection,
                uri,
            )
            with self._reading("dropping"):
                self.client.drop_collection(self.collection)
        try:
            if manifest.index_state.get("synced_generation") != manifest.generation or (
                not self.client.has_collection(self.collection)
            ):
                self._resync()
                self._resynced = manifest
            else:
                self._record_owner()
            self.client.load_collection(self.collection)  # a reopened one starts released
        except _service_failures() as exc:  # damaged files of a Milvus Lite collection, say
            problem = f"{self.root}: Milvus collection '{self.collection}' cannot be read"
            why = _failure_reason(exc)
            if not repair:
                raise GalleryError(
                    f"{problem} ({why}); `shitu index rebuild {self.root}` builds it "
                    "again from the stored features"
                ) from None
            logger.warning("%s (%s); building it again from the stored features", problem, why)
            self.client.drop_collection(self.collection)
            self.damaged = problem  # Gallery.open rebuilds it

    def _record_owner(self) -> None:
        """Record this library's folder in its collection where that records another (the
        library was moved, or its collection made by a shitu that recorded none), so that
        a build told to replace the collection finds the library that uses it. Where Milvus
        refuses the change (a server user with read-only rights), the library opens all
        the same: only that protection is missing."""
        folder = str(self.root.resolve())
        with suppress(*_service_failures()):
            properties = self.client.describe_collection(self.collection).get("properties")
            if (properties or {}).get(OWNER_PROPERTY) != folder:
                self.client.alter_collection_properties(self.collection, {OWNER_PROPERTY: folder})

    def _library_using_collection(self) -> Path | None:
        """The library recorded in the collection (`OWNER_PROPERTY`) where it still uses it:
        for a build's staging folder, the library it became, or the folder itself while the
        build runs (one killed outright left the collection to no library). None where none
        does, or the collection records none (made by an earlier shitu, or another program).
        This new library's own folder is not another's: a library deleted and made again in
        its place (`Gallery.create`) finds its old path recorded."""
        with self._reading("looking into"):
            properties = self.client.describe_collection(self.collection).get("properties")
        recorded = (properties or {}).get(OWNER_PROPERTY)
        if not recorded:
            return None
        folders = [Path(recorded)]
        target = staging_target(folders[0])
        if target is not None:  # a build's: the library it became, its folder while it runs
            folders = [target] + (folders if staging_in_progress(folders[0]) else [])
        for folder in folders:
            if folder != self.root.resolve() and _uses_collection(folder, self.collection):
                return folder
        return None

    def _holds_rows(self) -> bool:
        """Whether the collection exists with rows (deleted ones count until compaction)."""
        if not self.client.has_collection(self.collection):
            return False
        self.client.flush(self.collection)  # a server's count leaves out rows not yet flushed
        return int(self.client.get_collection_stats(self.collection)["row_count"]) > 0

    def _check_index_type(self, index_type: str) -> None:
        """Milvus Lite has no IVF_PQ: its background index build fails, the rows stay
        unindexed, and the collection then never loads (the library would not open)."""
        if self._lite_path and index_type == "IVFPQ":
            raise UnsupportedIndexError(
                "Milvus Lite has no IVFPQ index; choose Flat, IVF or HNSW32, or "
                "a Milvus server (`uri` http://host:19530, --milvus-uri in the CLI)"
            )

    def _create_collection(self) -> None:
        from pymilvus import DataType

        manifest = self.manifest
        self._check_index_type(manifest.index_type)
        if self.client.has_collection(self.collection):
            self.client.drop_collection(self.collection)
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=manifest.embedding_dim)
        kind, params = index_params(
            manifest.index_type, manifest.embedding_dim, manifest.backend_options
        )
        indexes = self.client.prepare_index_params()
        indexes.add_index(
            field_name="vector", index_type=kind, metric_type=manifest.metric.upper(), params=params
        )
        self.client.create_collection(
            self.collection,
            schema=schema,
            consistency_level=CONSISTENCY,
            properties={OWNER_PROPERTY: str(self.root.resolve())},
        )
        # Milvus Lite builds the index at once but lacks the call a synchronous create_index
        # polls with (its server logs a NotImplementedError traceback); a server is waited for.
        self.client.create_index(self.collection, indexes, sync=self._lite_path is None)

    def _insert(self, ids: np.ndarray, features: np.ndarray) -> None:
        """Insert in requests of at most INSERT_BATCH rows and INSERT_BYTES of vectors."""
        row_bytes = features.shape[1] * 4 + 8  # float32 vector and int64 id
        for part in _request_slices(len(ids), row_bytes, INSERT_BATCH, INSERT_BYTES):
            rows = [
                {"id": int(i), "vector": f} for i, f in zip(ids[part], features[part], strict=True)
            ]
            self.client.insert(self.collection, rows)

    def _resync(self) -> None:
        """Rebuild the collection from the stored features (the source of truth)."""
        self._create_collection()
        ids, features = self.store.features(self.manifest.embedding_dim)
        self._insert(ids, features)
        # A server leaves a collection made without index settings released (Milvus Lite
        # loads it): searches after a rebuild in this process would fail until reopened.
        self.client.load_collection(self.collection)

    def finish_open(self) -> None:
        if self._resynced is not None:
            self._mark_synced(self._resynced)
            self._resynced = None

    def _mark_synced(self, manifest: Manifest) -> None:
        with self.store.transaction():
            current = self.store.read_manifest()
            if current is not None and current.generation == manifest.generation:
                current.index_state = {"synced_generation": manifest.generation}
                self.store.write_manifest(current)
                self.manifest = current

    @property
    def ntotal(self) -> int:
        # count(*) is exact after deletes; collection stats count deleted rows until compaction.
        with self._reading("counting the vectors of"):
            rows = self.client.query(
                self.collection,
                filter="",
                output_fields=["count(*)"],
                consistency_level=CONSISTENCY,
            )
        return int(rows[0]["count(*)"])

    def stage(self, change: Change, manifest: Manifest) -> dict[str, Any]:
        self._check_index_type(manifest.index_type)  # before the commit that would record it
        self._pending = change if change.touches_vectors else None
        if self._pending is None:
            return {"synced_generation": manifest.generation}
        return dict(self.manifest.index_state)  # stale until publish() has applied the change

    def publish(self, manifest: Manifest) -> None:
        change, self._pending = self._pending, None
        self.manifest = manifest
        if change is None:
            return
        if change.rebuild:
            with self._applying("rebuilding"):
                self._resync()
        else:
            if len(change.removed_ids):
                with self._applying("removing vectors from"):
                    self.client.delete(self.collection, ids=[int(i) for i in change.removed_ids])
            if len(change.added_ids):
                assert change.added is not None  # a Change gives the vectors of the ids it adds
                with self._applying("adding vectors to"):
                    self._insert(change.added_ids, change.added)
        self._mark_synced(manifest)  # not reached after a failure: the collection stays stale

    def _failure(self, doing: str, exc: Exception) -> str:
        why = _failure_reason(exc)
        return f"Milvus failed while {doing} collection '{self.collection}' ({why})"

    @contextmanager
    def _applying(self, doing: str) -> Iterator[None]:
        """Milvus failing to apply a committed write, as an IndexSyncError that says so."""
        try:
            yield
        except _service_failures() as exc:
            raise IndexSyncError(self.root, self._failure(doing, exc)) from exc

    @contextmanager
    def _reading(self, doing: str) -> Iterator[None]:
        """Milvus failing a search, a count, or a new library's look into its collection or
        drop of it (the server gone, say), as a GalleryError that says so rather than
        pymilvus's exception."""
        try:
            yield
        except _service_failures() as exc:
            raise IndexUnavailableError(f"{self.root}: {self._failure(doing, exc)}") from exc

    def search(self, queries: np.ndarray, k: int, newest_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Hits of equal score cut at k are the first added (lowest ids), as Faiss keeps them:
        Milvus keeps whichever it meets (Milvus Lite answered the third of three copies of
        one photo for k=1), so a row whose last hit ties its k-th is asked again for more.
        At most LIMIT_MAX hits are asked for, which a server refuses more than and Milvus
        Lite gives: the hits past it are padding with either."""
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        rows = np.arange(len(queries))
        limit = min(k + 1, LIMIT_MAX)  # one hit more shows a tie cut at k
        while len(rows):
            got_scores, got_ids = self._hits(queries[rows], limit, newest_id)
            best = np.lexsort((got_ids, -got_scores), axis=-1)[:, :k]
            width = best.shape[1]
            scores[rows, :width] = np.take_along_axis(got_scores, best, -1)
            ids[rows, :width] = np.take_along_axis(got_ids, best, -1)
            if limit >= LIMIT_MAX:
                break
            rows = rows[(got_ids[:, -1] >= 0) & (got_scores[:, -1] == scores[rows, k - 1])]
            limit = min(2 * limit, LIMIT_MAX)
        return scores, ids

    def _hits(
        self, queries: np.ndarray, limit: int, newest_id: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids [Q, limit], best first, in requests of at most SEARCH_BATCH queries
        and SEARCH_BYTES."""
        raw = np.full((len(queries), limit), np.nan, np.float32)
        ids = np.full((len(queries), limit), -1, np.int64)
        params = search_params(self.manifest.index_type, limit, self.manifest.backend_options)
        query_bytes = queries.shape[1] * 4 + limit * 12  # float32 vector; int64 ids, distances
        with self._reading("searching"):
            for part in _request_slices(len(queries), query_bytes, SEARCH_BATCH, SEARCH_BYTES):
                hits = self.client.search(
                    self.collection,
                    data=list(queries[part]),
                    limit=limit,
                    filter=f"id <= {int(newest_id)}",
                    consistency_level=CONSISTENCY,
                    search_params={"metric_type": self.manifest.metric.upper(), "params": params},
                )
                for row, row_hits in enumerate(hits, start=part.start):
                    for col, hit in enumerate(row_hits):
                        ids[row, col] = hit["id"]
                        raw[row, col] = hit["distance"]
        return scores_from_distances(raw, ids, self.manifest.metric, self.manifest.normalize), ids

    def problems(self) -> list[str]:
        count, held = self.store.count(), self.ntotal
        return [] if held == count else [f"milvus holds {held} vectors, library has {count}"]

    def discard(self) -> None:
        """Drop the collection; where Milvus fails to, say so and go on (the caller is
        already failing): the next library given it would refuse it while it holds rows."""
        try:
            self.client.drop_collection(self.collection)
        except _service_failures() as exc:
            logger.warning(
                "%s; the next library built with it drops it with --replace-collection",
                self._failure("dropping", exc),
            )

    def close(self) -> None:
        self.client.close()
        path = self._lite_path
        if not path or self._closed:  # counted down once
            return
        self._closed = True
        with _lite_users_lock:
            _lite_users[path] -= 1
            if _lite_users[path] <= 0:
                del _lite_users[path]
                # Milvus Lite serves the file from this process until released; release it
                # so another process can open the library.
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(path)
