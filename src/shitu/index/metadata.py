"""SQLite store of a library: one row per image (metadata and feature) plus the manifest.

Features live here, beside the index, so any index type can be rebuilt from them (HNSW
cannot delete in place) and so every change commits in one SQLite transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import GalleryError
from shitu.index.labels import normal_form
from shitu.index.manifest import Manifest

logger = logging.getLogger(__name__)

LIBRARY_FILE = "gallery.sqlite"  # a library folder's database
LOCK_WAIT_S = 60.0  # how long a writer waits for another process's write to finish
WAIT_NOTICE_S = 1.0  # a write waiting longer for another process's says so (not a hang)
# SQLite's own wait for a lock per try (in C, where a Ctrl-C is not handled): tries are
# repeated for up to LOCK_WAIT_S, and between them the process handles signals
LOCK_POLL_S = 0.1
FETCH_ROWS = 4096  # feature rows read per step
SCHEMA = """
CREATE TABLE IF NOT EXISTS manifest (
    key INTEGER PRIMARY KEY CHECK (key = 0),
    document TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    label TEXT NOT NULL,
    sha256 TEXT,
    added_at TEXT NOT NULL,
    feature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS images_label ON images (label);
CREATE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
"""


class LibraryBusyError(GalleryError):
    """Another process has the library: it held the database locked for longer than
    LOCK_WAIT_S, or it has the library's Milvus Lite file open (one process at a time)."""


class LockWaitStopped(LibraryBusyError):
    """A wait for another process's lock that `MetadataStore.stop_waiting` cut short."""


class _Connection(sqlite3.Connection):
    """Statements that find the file damaged ("database disk image is malformed") or cannot
    write it (a full disk) raise a GalleryError naming it, as opening such a file does, not
    SQLite's bare error, and ones that waited LOCK_WAIT_S for another process's lock a
    LibraryBusyError; constraint errors stay as SQLite raises them."""

    path: Path
    waits_stopped: threading.Event  # set: a statement kept waiting gives up at its next try

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        """The statement, tried again while another process's lock keeps it waiting, up to
        LOCK_WAIT_S (or until `waits_stopped` is set); a write kept waiting past
        WAIT_NOTICE_S says so."""
        started, noticed = time.monotonic(), False
        while True:
            try:
                return super().execute(sql, parameters)
            except sqlite3.DatabaseError as exc:
                waited = time.monotonic() - started
                if not _locked_out(exc) or waited >= LOCK_WAIT_S or self.waits_stopped.is_set():
                    self._raise_for(exc)
                    raise
            if sql == "BEGIN IMMEDIATE" and waited >= WAIT_NOTICE_S and not noticed:
                noticed = True
                logger.warning(
                    "%s: another process is writing to the library; waiting up to %g s for "
                    "it to finish",
                    self.path,
                    LOCK_WAIT_S,
                )

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.DatabaseError as exc:
            self._raise_for(exc)
            raise

    def _raise_for(self, exc: sqlite3.DatabaseError) -> None:
        if type(exc) is sqlite3.DatabaseError:  # its subclasses: locked, a constraint, ...
            raise GalleryError(f"{self.path}: not a readable gallery database ({exc})") from exc
        if exc.sqlite_errorcode == sqlite3.SQLITE_READONLY_DBMOVED:  # SQLite's own words:
            # "attempt to write a readonly database", a 500 "internal error" from the server
            raise GalleryError(
                f"{self.path}: the library was deleted or replaced (built again?) since this "
                "process opened it; nothing was changed: open it again (restart `shitu serve`)"
            ) from exc
        # The file read-only, or its folder, where SQLite cannot make its journal: else a
        # traceback of SQLite's words ("unable to open database file")
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            raise GalleryError(
                f"{self.path}: cannot write the library ({exc}: is the file, or its folder, "
                "read-only to this user?); nothing was changed"
            ) from exc
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            raise GalleryError(
                f"{self.path}: cannot write the library ({exc}: is its disk full?); nothing "
                "was changed"
            ) from exc
        if _locked_out(exc) and self.waits_stopped.is_set():
            raise LockWaitStopped(
                f"{self.path}: another process holds the library's lock, and this one stopped "
                "waiting for it as it is closing; nothing was changed, retry when it is back"
            ) from exc
        if _locked_out(exc):  # a reader waiting on a commit
            raise LibraryBusyError(
                f"{self.path}: another process has been committing a write to the library "
                f"for over {LOCK_WAIT_S:g} s; retry when it has finished"
            ) from exc


def _locked_out(exc: sqlite3.DatabaseError) -> bool:
    """Whether a statement failed for another process's lock on the database."""
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF == (
        sqlite3.SQLITE_BUSY
    )


@dataclass(frozen=True)
class ImageEntry:
    """One gallery image as stored (without its feature)."""

    id: int
    path: str
    label: str
    sha256: str | None
    added_at: str


@dataclass(frozen=True)
class NewImage:
    path: str
    label: str
    sha256: str | None
    added_at: str


class MetadataStore:
    """Thin typed wrapper over the library's SQLite file; writes happen inside `transaction()`."""

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        self._reading = False
        try:
            # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE.
            self.conn = sqlite3.connect(
                path, isolation_level=None, timeout=LOCK_POLL_S, factory=_Connection
            )
            self.conn.path = path
            self.conn.waits_stopped = threading.Event()
            self.conn.execute("PRAGMA synchronous = FULL")
            # A write keeps its changed pages in memory until it commits: spilling them into
            # the file takes the exclusive lock, and every other process's reads would wait
            # for the rest of the write (a large add or re-embedding: its index built, minutes)
            self.conn.execute("PRAGMA cache_spill = OFF")
            if create:
                self.conn.executescript(SCHEMA)
            self.conn.execute("SELECT COUNT(*) FROM images").fetchone()
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{path}: not a readable gallery database ({exc})") from exc

    def close(self) -> None:
        self.conn.close()

    def stop_waiting(self) -> None:
        """Have statements kept waiting by another process's lock give up at their next try
        (within LOCK_POLL_S), and later ones at their first, with a LockWaitStopped: for a
        process that is closing. Any thread may call it."""
        self.conn.waits_stopped.set()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Take the write lock for the whole change; roll back on any exception.

        Inside an open transaction this joins it, so helpers can be called from a write.
        """
        if self.conn.in_transaction:
            if self._reading:
                raise RuntimeError("a write cannot join a read: SQLite cannot upgrade its lock")
            yield
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except LockWaitStopped:
            raise
        except LibraryBusyError:
            raise LibraryBusyError(
                f"{self.path}: cannot lock the library for writing: another process has been "
                f"writing to it for over {LOCK_WAIT_S:g} s (a rebuild or re-embedding of a large "
                "library takes minutes); nothing was changed, retry when it has finished"
            ) from None
        try:
            yield
            self.conn.execute("COMMIT")
        except LibraryBusyError as exc:  # at COMMIT: SQLite keeps the transaction open, to retry
            self._roll_back()
            if isinstance(exc, LockWaitStopped):
                raise
            raise LibraryBusyError(
                f"{self.path}: cannot commit: another process has been reading the library "
                f"for over {LOCK_WAIT_S:g} s (e.g. checking or listing a large library); "
                "nothing was changed, retry when it has finished"
            ) from None
        except BaseException:
            self._roll_back()
            raise

    def _roll_back(self) -> None:
        """ROLLBACK, where SQLite has not rolled back by itself (it does on a full disk or an
        I/O error: a second ROLLBACK would hide that error behind its own)."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold a read lock: everything read inside is one committed state, and no writer
        commits (nor then deletes the index file that state names) until it ends."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        self._reading = True
        try:
            self.conn.execute("SELECT COUNT(*) FROM manifest").fetchone()  # the lock, now
            yield
        finally:
            self._reading = False
            self.conn.execute("COMMIT")

    def read_manifest(self) -> Manifest | None:
        row = self.conn.execute("SELECT document FROM manifest WHERE key = 0").fetchone()
        return Manifest.from_json(row[0], str(self.path)) if row else None

    def write_manifest(self, manifest: Manifest) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO manifest (key, document) VALUES (0, ?)", (manifest.to_json(),)
        )

    def insert(self, images: Sequence[NewImage], features: np.ndarray) -> np.ndarray:
        """Insert rows; ids come from AUTOINCREMENT so a removed image's id is never reused."""
        ids = []
        for image, feature in zip(images, features, strict=True):
            cursor = self.conn.execute(
                "INSERT INTO images (path, label, sha256, added_at, feature) VALUES (?,?,?,?,?)",
                (image.path, image.label, image.sha256, image.added_at, feature.tobytes()),
            )
            ids.append(cursor.lastrowid)
        return np.asarray(ids, dtype=np.int64)

    def existing_hashes(self, hashes: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(list(hashes)):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(f"SELECT sha256 FROM images WHERE sha256 IN ({marks})", chunk)
            found.update(row[0] for row in rows)
        return found

    def first_with_hashes(self, hashes: Sequence[str]) -> dict[str, tuple[int, str]]:
        """For each of these content hashes the library has, its first image's id and label."""
        found: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(list(hashes)):
            marks = ",".join("?" * len(chunk))
            query = (
                f"SELECT sha256, MIN(id), label FROM images WHERE sha256 IN ({marks}) "
                "GROUP BY sha256"  # SQLite takes the label from the row of MIN(id)
            )
            found.update(
                (digest, (image_id, label))
                for digest, image_id, label in self.conn.execute(query, chunk)
            )
        return found

    def stored_forms(self, labels: Sequence[str]) -> list[str]:
        """The labels as stored that are `labels` trimmed and in normal form (rows stored
        before labels were normalised may hold another form of a name), picked from the
        distinct labels so that the rows are then found through the label index, not a scan
        of them all."""
        wanted = {normal_form(str(label).strip()) for label in labels}  # stored: trimmed
        distinct = self.conn.execute("SELECT DISTINCT label FROM images")
        return [stored for (stored,) in distinct if normal_form(stored) in wanted]

    def ids_with_labels(self, labels: Sequence[str]) -> list[int]:
        ids: list[int] = []
        for chunk in _chunks(self.stored_forms(labels)):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(f"SELECT id FROM images WHERE label IN ({marks})", chunk)
            ids.extend(row[0] for row in rows)
        return ids

    def delete(self, ids: Sequence[int]) -> np.ndarray:
        """Delete the given ids; returns those that existed."""
        deleted: list[int] = []
        for chunk in _chunks([int(i) for i in ids]):
            marks = ",".join("?" * len(chunk))
            query = f"DELETE FROM images WHERE id IN ({marks}) RETURNING id"
            rows = self.conn.execute(query, chunk)
            deleted.extend(row[0] for row in rows)
        return np.asarray(sorted(deleted), dtype=np.int64)

    def relabel(self, old: str, new: str) -> np.ndarray:
        """Give every image labelled `old` (any stored form) the label `new`; returns their ids."""
        forms = self.stored_forms([old])  # one form, or a few from older versions
        marks = ",".join("?" * len(forms))
        query = f"UPDATE images SET label = ? WHERE label IN ({marks}) RETURNING id"
        ids = [row[0] for row in self.conn.execute(query, (new, *forms))]
        return np.asarray(sorted(ids), dtype=np.int64)

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def counts(self) -> tuple[int, int]:
        """How many images, and how many distinct labels they have."""
        return self.conn.execute("SELECT COUNT(*), COUNT(DISTINCT label) FROM images").fetchone()

    def label_counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT label, COUNT(*) FROM images GROUP BY label ORDER BY label")
        return dict(rows.fetchall())

    def entries(self, label: str | None = None) -> list[ImageEntry]:
        query = "SELECT id, path, label, sha256, added_at FROM images"
        if label is None:
            return [ImageEntry(*row) for row in self.conn.execute(query + " ORDER BY id")]
        forms = self.stored_forms([label])
        marks = ",".join("?" * len(forms))
        rows = self.conn.execute(query + f" WHERE label IN ({marks}) ORDER BY id", forms)
        return [ImageEntry(*row) for row in rows]

    def entries_with_ids(self, ids: Sequence[int]) -> list[ImageEntry]:
        """The rows with these ids (ordered by id), found through the primary key."""
        found: list[ImageEntry] = []
        for chunk in _chunks([int(i) for i in ids]):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id, path, label, sha256, added_at FROM images WHERE id IN ({marks})"
            found.extend(ImageEntry(*row) for row in self.conn.execute(query, chunk))
        return sorted(found, key=lambda entry: entry.id)

    def id_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """All ids (ascending) and their labels, for turning search hits into labels fast."""
        rows = self.conn.execute("SELECT id, label FROM images ORDER BY id").fetchall()
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        labels = np.empty(len(rows), dtype=object)
        labels[:] = [row[1] for row in rows]
        return ids, labels

    def features(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """All ids (ascending) and their stored features [N, dim].

        Read FETCH_ROWS rows at a time into one array: fetching every row first, then
        joining their bytes, held the features more than twice over.
        """
        with self.reading():  # the count and the rows of one committed state
            count = self.count()
            ids = np.empty(count, dtype=np.int64)
            features = np.empty((count, dim), dtype=np.float32)
            cursor = self.conn.execute("SELECT id, feature FROM images ORDER BY id")
            done = 0
            while rows := cursor.fetchmany(FETCH_ROWS):
                end = done + len(rows)
                ids[done:end] = [row[0] for row in rows]
                features[done:end] = self._decoded([row[1] for row in rows], dim)
                done = end
        return ids, features

    def ids(self) -> np.ndarray:
        """All ids, ascending (what an index must hold), without their labels."""
        rows = self.conn.execute("SELECT id FROM images ORDER BY id").fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    def features_with_ids(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """The stored features [len(ids), dim] of these ids (all stored), in their order:
        the rows an index file predates, found through the primary key."""
        blobs: dict[int, bytes] = {}
        for chunk in _chunks([int(i) for i in ids]):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id, feature FROM images WHERE id IN ({marks})"
            blobs.update(self.conn.execute(query, chunk).fetchall())
        return self._decoded([blobs[int(i)] for i in ids], dim)

    def _decoded(self, blobs: list[bytes], dim: int) -> np.ndarray:
        """Stored feature blobs as float32 rows [len(blobs), dim]; a blob of another size
        (even where another's would make up the length) is refused."""
        if any(len(blob) != dim * 4 for blob in blobs):
            raise GalleryError(f"{self.path}: stored features are not all {dim}-d float32")
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dim)

    def replace_features(
        self, ids: np.ndarray, features: np.ndarray, hashes: Sequence[str | None]
    ) -> None:
        """New features of these rows, with the content hashes of the files they came from."""
        self.conn.executemany(
            "UPDATE images SET feature = ?, sha256 = ? WHERE id = ?",
            (
                (f.tobytes(), digest, int(i))
                for i, f, digest in zip(ids, features, hashes, strict=True)
            ),
        )

    def move_files(self, paths: dict[int, str]) -> None:
        """Record new paths of these rows' files (by id), as stored: files that moved."""
        self.conn.executemany(
            "UPDATE images SET path = ? WHERE id = ?",
            ((path, int(i)) for i, path in paths.items()),
        )

    def integrity_problems(self) -> list[str]:
        try:
            rows = self.conn.execute("PRAGMA integrity_check").fetchall()
        except (sqlite3.DatabaseError, GalleryError) as exc:  # too damaged to be checked
            return [f"sqlite: {exc}"]
        return [] if rows == [("ok",)] else [f"sqlite: {row[0]}" for row in rows]


def _chunks(items: list, size: int = 500) -> Iterator[list]:
    """SQLite limits the number of bound parameters per statement."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
