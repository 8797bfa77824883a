"""The gallery library: labelled image features that can be searched, edited and re-embedded.

A library is a folder holding `gallery.sqlite` (manifest, image rows, features) and the
backend's index (Faiss: an `index-<generation>-<random>.faiss` checkpoint; Milvus: a
collection). Every write is one SQLite transaction that commits the rows with the manifest,
which names the index file and counts the rows changed since it (a small write leaves the
file and changes the index in memory; opening replays those rows from SQLite), so a process
killed at any point leaves either the previous library or the new one.
"""

from __future__ import annotations

import errno
import math
import os
import shlex
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from shitu.errors import DataError, GalleryError, did_you_mean, first_few
from shitu.fileio import (
    check_writable,
    expanded_path,
    file_sha256,
    folder_place,
    fsync_dir,
    is_given_path,
    occupied,
    refuse_non_utf8_path,
    refuse_url,
    removed_if_left_empty,
    special_kind,
    staging_folder,
)
from shitu.image_files import unreadable_reason
from shitu.index.backends import Backend, Change, IndexSyncError, describe_index, open_backend
from shitu.index.embedder import Embedder
from shitu.index.files import crash_point
from shitu.index.labels import BadLabelError, GalleryItem, check_label, normal_form
from shitu.index.locking import ReadWriteLock
from shitu.index.manifest import (
    BACKENDS,
    INDEX_TYPES,
    LOCATION_OPTIONS,
    SHIPPED_LIBRARY_NOTE,
    SHIPPED_MODEL_NOTE,
    Manifest,
    ModelMismatchError,
    given_options,
    now,
    unread_options,
)
from shitu.index.metadata import LIBRARY_FILE, ImageEntry, MetadataStore, NewImage
from shitu.values import is_whole_number
from shitu.vectors import finite_rows, l2_normalize

if TYPE_CHECKING:
    from shitu.progress import ImageProgress

# What PaddleClas's build_gallery.py writes into its IndexProcess.index_dir: a folder
# that a PaddleClas inference_general.yaml given to `-c` names.
PADDLE_INDEX_FILES = ("vector.index", "id_map.pkl")
# The manifest of a `shitu export` folder (shitu.inference's MANIFEST): the model, easily
# given as the library beside it (`--gallery my_model`).
EXPORT_MANIFEST = "shitu_model.json"
T = TypeVar("T")
# Rounds of embedding the images other processes added while a re-embedding ran, before it
# gives up: each round embeds only what arrived during the one before, so only a library
# that grows about as fast as it can be embedded runs out of them.
REEMBED_CATCH_UPS = 5
# The fewest files an add hashes under a bar of their own (where bars are drawn). Hashing
# reads every byte (SHA-256 itself runs at about 1 GB/s): 500 photos of 3 MB are 1.5 GB, a
# second or two from an SSD, 15 s from a hard disk at 100 MB/s, longer from a network share;
# fewer are hashed before a bar would say anything, and one flashing by is only noise.
HASH_BAR_MIN_FILES = 500
# The most files a refused re-embedding names, folders of gone files a note names, or
# unknown labels a refused remove names (the rest are counted).
SHOWN_FILES = 5
# How a refused feature array's values are named, by numpy dtype kind (Gallery._prepare).
_DTYPE_KINDS = {"b": "bool", "i": "integer", "u": "integer", "c": "complex", "O": "object"}
# Why a file the model gave NaN or inf features is not added (Gallery.add_checked_files).
NOT_FINITE = "the model gave NaN or inf features (a broken model, or its runtime overflowing?)"
# Why a file whose path is not UTF-8 text is not added (Gallery._storable).
NAME_NOT_UTF8 = "its path is not UTF-8 text, which the library records paths in: rename it"


@dataclass(frozen=True)
class SearchResult:
    """Top-k hits per query, best first (of equal scores, the image added first), as [Q, k]
    arrays, k cut to the images the library holds (at least 1): a k past that would only
    add padding, and a huge one would not fit in memory.

    Scores are higher-is-more-similar: the cosine similarity for every metric in a library
    that normalises its features (the default), else the inner product or the negated
    Euclidean distance. Slots without a hit (an empty library, a backend that found fewer,
    below `min_score`, or an all-zero query in a library that normalises) are padding: id
    -1, label "", score -inf.
    """

    labels: np.ndarray
    scores: np.ndarray
    ids: np.ndarray

    @property
    def found(self) -> np.ndarray:
        """Boolean [Q, k] mask of real hits."""
        return self.ids >= 0

    def to_list(self) -> list[list[dict[str, Any]]]:
        """Per query, its real hits (no padding) best first as `{"label", "score",
        "image_id"}` in plain Python types for `json.dumps`, the score rounded to 5 decimals:
        the results `shitu index search --format jsonl` writes."""
        return [
            [
                {"label": str(label), "score": round(float(score), 5), "image_id": int(image_id)}
                for label, score, image_id in zip(labels, scores, ids, strict=True)
                if image_id >= 0
            ]
            for labels, scores, ids in zip(self.labels, self.scores, self.ids, strict=True)
        ]


@dataclass
class AddReport:
    """Ids of the added images and what was skipped, so callers can tell the user."""

    ids: np.ndarray
    duplicates: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def include(self, later: AddReport) -> None:
        """Count in a later write of the same add (an add committed in parts)."""
        self.ids = np.concatenate([self.ids, later.ids])
        self.duplicates += later.duplicates
        self.failures += later.failures


NOTED_FAILURES = 5  # the failures a NothingAddedError names in its notes


class NothingAddedError(GalleryError):
    """A build none of whose images could be added: no library is made. `report` says
    why (each unreadable file's reason, duplicates)."""

    def __init__(self, path: Path, given: int, report: AddReport) -> None:
        self.report = report
        super().__init__(f"{path}: not built, none of the {given} images was added")
        # Why, in notes that a traceback shows below the message: from Python it named no
        # reason; a command prints each failure itself, then the message alone.
        for file, reason in report.failures[:NOTED_FAILURES]:
            self.add_note(f"not added: {file}: {reason}")
        if len(report.failures) > NOTED_FAILURES:
            more = len(report.failures) - NOTED_FAILURES
            self.add_note(f"and {more} more (the error's report.failures lists them all)")


@dataclass(frozen=True)
class FilesToAdd:
    """What `Gallery.check_files` found: the files to embed, each with its content hash,
    and those left out, as an AddReport names them."""

    files: list[tuple[GalleryItem, str]]
    duplicates: list[str]
    failures: list[tuple[str, str]]

    def report(self) -> AddReport:
        """A report of the files left out, for the writes that add the rest to extend."""
        return AddReport(np.zeros(0, np.int64), list(self.duplicates), list(self.failures))


def _committed_manifest(
    root: Path, store: MetadataStore, model: tuple[str, int] | None
) -> Manifest:
    """The library's manifest as last committed; with `model` (fingerprint, embedding size),
    refused unless the library holds that model's features."""
    manifest = store.read_manifest()
    if manifest is None:
        raise GalleryError(f"{root / LIBRARY_FILE}: library has no manifest")
    if model is not None:
        manifest.check_model(*model, str(root))
    return manifest


def _refuse_reembedded(root: Path, committed: Manifest, model: tuple[str, int]) -> None:
    """A ModelMismatchError where the library as `committed` holds another model's features
    than `model` (fingerprint, embedding size), the one it held when this process opened
    it: another process has re-embedded it since. `check_model`'s advice (another model or
    precision, or a re-embedding) is wrong here: the re-embedding is what happened."""
    fingerprint, size = committed.model_fingerprint, committed.embedding_dim
    if (fingerprint, size) != model:
        raise ModelMismatchError(
            f"{root}: re-embedded with model {fingerprint} ({size}-d features) by another "
            f"process since this one opened it (of model {model[0]}); nothing was changed: "
            f"open it again, with model {fingerprint}",
            fingerprint,
        )


def _open_store(root: Path) -> MetadataStore:
    """The library's database, refused with a one-line error where there is no library."""
    if not root.exists():
        raise GalleryError(f"{root}: no such gallery library (build one with `shitu index build`)")
    if not (root / LIBRARY_FILE).is_file():
        database = root / LIBRARY_FILE
        if database.exists():  # a folder or a FIFO in its place: no "no gallery.sqlite"
            kind = "a folder" if database.is_dir() else special_kind(database.stat())
            raise GalleryError(f"{database}: {kind}, not the library's database (a file)")
        if root.is_file() and (root.parent / LIBRARY_FILE).is_file():  # its database, say
            raise GalleryError(f"{root}: a file of the library {root.parent}; give its folder")
        if all((root / name).is_file() for name in PADDLE_INDEX_FILES):
            # Its vectors are Paddle's model's features, and its labels live in a pickle.
            raise GalleryError(
                f"{root}: a PaddleClas index ({', '.join(PADDLE_INDEX_FILES)}), not a shitu "
                "gallery library; build one from the gallery images' label file (PaddleClas's "
                "IndexProcess.data_file, `path<TAB>label`): `shitu index build DATA_FILE --out "
                "LIB`, then give LIB as --gallery (or IndexProcess.index_dir)"
            )
        if (root / EXPORT_MANIFEST).is_file():
            raise GalleryError(
                f"{root}: an exported model, not a gallery library; give it as --model, and "
                "as --gallery the library that `shitu index build IMAGES --out LIB --model "
                f"{root}` makes"
            )
        if not root.is_dir() and not root.is_file():  # a device, a FIFO: no list to build from
            raise GalleryError(f"{root}: {special_kind(root.stat())}, not a gallery library")
        inner = _libraries_in(root)
        if inner:  # `shitu demo`'s folder, whose library is its gallery/, say
            shown = " or ".join(str(path) for path in inner[:3])
            raise GalleryError(f"{root}: not a gallery library, but holds one: give {shown}")
        # `index build` takes images, `recognize --gallery` a library: easily
        # given the one for the other.
        raise GalleryError(
            f"{root}: not a gallery library (no {LIBRARY_FILE}); for a folder or list of "
            f"gallery images, build one first: `shitu index build {shlex.quote(str(root))} "
            "--out LIB`"
        )
    return MetadataStore(root / LIBRARY_FILE)


def _libraries_in(folder: Path) -> list[Path]:
    """The libraries directly inside `folder`, by name (none where it cannot be listed)."""
    try:
        return sorted(path for path in folder.iterdir() if (path / LIBRARY_FILE).is_file())
    except OSError:  # a file, or a folder that may not be read
        return []


def _full_entries(root: Path, entries: list[ImageEntry]) -> list[ImageEntry]:
    """Stored images, each with the full path of its file (library-relative paths made whole)."""
    base = root.resolve()
    return [
        e if os.path.isabs(e.path) or not e.path else replace(e, path=str(base / e.path))
        for e in entries
    ]


def _stats(root: Path, manifest: Manifest, images: int, labels: int) -> dict[str, Any]:
    """What `stats` reports: the counts, and the manifest's model and index facts."""
    return {
        "path": str(root),
        "images": images,
        "labels": labels,
        "model_fingerprint": manifest.model_fingerprint,
        "embedding_dim": manifest.embedding_dim,
        "metric": manifest.metric,
        "normalize": manifest.normalize,
        "backend": manifest.backend,
        "index_type": manifest.index_type,
        "backend_options": manifest.backend_options,  # search settings, Milvus uri, ...
        "index": describe_index(manifest),
        "generation": manifest.generation,
        "created_at": manifest.created_at,
        "updated_at": manifest.updated_at,
    }


class Catalog:
    """A library's labels, images and stats, read without its index (`shitu index list`
    and `stats`): a Faiss index is read whole and checksummed when a Gallery opens, and a
    Milvus collection is connected to and loaded, which on a big library takes long."""

    def __init__(self, path: str | Path) -> None:
        self.root = _library_path(path)
        self._store = _open_store(self.root)
        self._closed = False
        try:
            _committed_manifest(self.root, self._store, None)  # refused as Gallery.open does
        except BaseException:
            self._store.close()
            raise

    def close(self) -> None:
        """Close the database connection; every later call but `close` is refused."""
        self._closed = True
        self._store.close()

    def _check_open(self) -> None:
        """Refuse a call once closed, as a Gallery does: SQLite's refusal surfaced as an
        AttributeError of the error handling ('no attribute sqlite_errorcode')."""
        if self._closed:
            raise GalleryError(f"{self.root}: the catalog is closed")

    def __enter__(self) -> Catalog:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def label_counts(self) -> dict[str, int]:
        """As `Gallery.label_counts`."""
        self._check_open()
        return self._store.label_counts()

    def entries(self, label: str | None = None) -> list[ImageEntry]:
        """As `Gallery.entries`."""
        self._check_open()
        return _full_entries(self.root, self._store.entries(label))

    def stats(self) -> dict[str, Any]:
        """As `Gallery.stats`."""
        self._check_open()
        with self._store.reading():  # the manifest and the counts of one generation
            manifest = _committed_manifest(self.root, self._store, None)
            images, labels = self._store.counts()
        return _stats(self.root, manifest, images, labels)


class Gallery:
    """An open library; use `Gallery.create` or `Gallery.open`, and `close()` (or `with`).

    Threads: `search` (and `len`, `stats`, `check_embedder`) may run in any thread, also
    while the thread that opened the library writes: each search sees one whole generation
    (the index and the labels of its ids), never half of a write. Every other method reads
    or writes the library's SQLite database, whose connection belongs to the thread that
    opened the library: from another thread it raises GalleryError. Open one Gallery per
    thread, or make those calls on one thread that owns it, as `shitu serve` does.
    """

    def __init__(
        self,
        root: Path,
        store: MetadataStore,
        backend: Backend,
        model: tuple[str, int] | None = None,
    ) -> None:
        self.root = root
        self._store = store
        self._backend = backend
        self.manifest = backend.manifest
        self._model = model  # (fingerprint, embedding size) the library must keep matching
        self._closed = False
        self.repaired = False  # whether `open(repair=True)` had to rebuild the index
        self._owner = threading.get_ident()  # the thread whose SQLite connection this is
        self._database = _file_identity(root / LIBRARY_FILE)  # the file opened
        # Searches share it, a write takes it alone to swap the index, ids and labels
        self._swap = ReadWriteLock()
        # Ids (ascending) and their labels, replaced together (one tuple) by each write
        self._id_labels = self._store.id_labels()
        # The change that made the loaded generation, where this object wrote it (None for
        # one opened or loaded from another's write): a copy of the rows can follow it
        self.last_change: Change | None = None

    def _check_usable(self, sqlite: bool = True) -> None:
        """Refuse a call on a closed library (its index and database are released), or one
        that touches SQLite from another thread than the one that opened the library."""
        if self._closed:
            raise GalleryError(f"{self.root}: the library is closed")
        if sqlite:
            self.check_thread()

    def check_thread(self) -> None:
        """A GalleryError unless called from the thread that opened the library, the one
        that may write and close it: for a caller that closes other things with it, to be
        refused before it has closed any."""
        if threading.get_ident() != self._owner:
            raise GalleryError(
                f"{self.root}: a Gallery is used from the thread that opened it (only search "
                "may run in other threads); open one per thread, or make every other call "
                "on one thread, as `shitu serve` does"
            )

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        embedding_dim: int,
        model_fingerprint: str,
        preprocessing: dict[str, Any] | None = None,
        metric: str = "ip",
        index_type: str = "Flat",
        backend: str = "faiss",
        backend_options: dict[str, Any] | None = None,
        normalize: bool = True,
        replace_collection: bool = False,
    ) -> Gallery:
        """Create an empty library (atomically: built in a temp folder, then renamed).

        `index_type` is one of `INDEX_TYPES`. `backend_options` (validated, stored in the
        manifest): for Faiss `ef_search` (HNSW32 search depth, default 64) and `nprobe`
        (IVF lists searched per query, default nlist/16, at least 8); for Milvus those two
        (`nprobe` default 16), `nlist` (IVF lists, default 1024), `uri` (a Milvus Lite `.db`
        file in the library, default `milvus.db`, or a server's `http://host:19530`) and
        `collection` (default `shitu_gallery`); one given as None is left out (its
        default). Faiss's own names (`efSearch`) are refused, and so is a setting
        `index_type` never reads (`nprobe` on Flat). A Milvus collection that holds
        vectors is refused as another library's, unless `replace_collection`,
        which drops them: a collection that no library uses any more (its library deleted,
        or a build killed outright) can be built into again; one that the library it was
        made for (recorded in it) still uses is refused all the same.
        """
        root = folder_place(_library_path(path))
        _refuse_non_utf8_root(root)
        existed = root.exists()
        if occupied(root):
            raise GalleryError(f"{root}: already exists and is not an empty folder")
        if replace_collection and backend != "milvus":
            raise GalleryError(f"replace_collection: only for the milvus backend, not {backend}")
        if not isinstance(model_fingerprint, str) or not model_fingerprint.strip():
            # stored, such a library would be refused to every model that tried to use it
            raise GalleryError(
                f"model_fingerprint: expected the model's fingerprint (text: its "
                f"FeatureExtractor's fingerprint), got {model_fingerprint!r}; "
                "Gallery.create_for(path, extractor) takes it from the model"
            )
        backend_options = given_options(backend_options or {})
        if backend in BACKENDS:  # an unknown backend is refused by name below
            Manifest.check_backend_options(backend, backend_options)
        manifest = Manifest(
            embedding_dim=embedding_dim,
            model_fingerprint=model_fingerprint,
            preprocessing=preprocessing or {},
            metric=metric,
            normalize=normalize,
            backend=backend,
            index_type=index_type,
            backend_options=backend_options,
        )
        Manifest.check_typed_options(index_type, manifest.backend_options)  # values first
        with removed_if_left_empty(root.parent):  # a create that fails leaves none of them
            _check_writable_place(root)  # a file in the way: named, no traceback
            # Staged as a build is: a write that fails (a full disk) or is interrupted leaves
            # no folder beside `path`, and one killed outright is removed by the next.
            with staging_folder(root, "creating") as tmp:
                tmp.mkdir()
                try:
                    store = MetadataStore(tmp / LIBRARY_FILE, create=True)
                    try:
                        with store.transaction():
                            store.write_manifest(manifest)
                    finally:
                        store.close()
                    _into_place(tmp, root)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            fsync_dir(root.parent)
            try:
                return cls._open(root, replace_collection=replace_collection)
            except BaseException:  # e.g. a Milvus collection another library holds: none made
                os.replace(root, tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                if existed:  # the empty folder it was given
                    root.mkdir()
                raise

    @classmethod
    def create_for(cls, path: str | Path, embedder: Embedder, **options: Any) -> Gallery:
        """`create` a library for `embedder`'s features (its size, fingerprint, preprocessing)."""
        _check_embedder(embedder)
        return cls.create(
            path,
            embedding_dim=embedder.embedding_size,
            model_fingerprint=embedder.fingerprint,
            preprocessing=dict(embedder.preprocessing),
            **options,
        )

    @classmethod
    def build(
        cls,
        path: str | Path,
        embedder: Embedder,
        items: Iterable[GalleryItem],
        *,
        batch_size: int = 32,
        progress: bool = False,
        allow_duplicates: bool = False,
        **options: Any,
    ) -> AddReport:
        """A new library at `path` of `items` embedded by `embedder`, as `shitu index build`
        makes it: written in a staging folder beside `path` and renamed into place once
        whole, so that a build that fails or is interrupted leaves nothing at `path`, nor a
        Milvus collection. `options`: `create`'s. Refused where `path` exists, unless an
        empty folder (as `create`); a NothingAddedError, with the report, where no image
        could be added."""
        root = folder_place(_library_path(path))
        _refuse_non_utf8_root(root)
        if occupied(root):
            raise GalleryError(
                f"{root}: already exists and is not an empty folder; give a path for the new "
                "library"
            )
        _check_embedder(embedder)
        items = gallery_items(items, "build")
        # The folders it goes in made, as `create` makes them: the staging beside it failed
        # on a FileNotFoundError that named its lock file
        with removed_if_left_empty(root.parent):  # a build that fails leaves none of them
            _check_writable_place(root)
            with staging_folder(root, "building") as tmp:
                try:
                    with cls.create_for(tmp, embedder, **options) as gallery:
                        try:
                            report = gallery.add_files(
                                embedder, items, batch_size, progress, allow_duplicates
                            )
                            if not len(report.ids):
                                raise NothingAddedError(root, len(items), report)
                        except BaseException:
                            gallery.discard()  # a Milvus collection, outside the folder
                            raise
                    _into_place(tmp, root)
                except BaseException as exc:
                    shutil.rmtree(tmp, ignore_errors=True)
                    if isinstance(exc, IndexSyncError):  # not "kept": its library was the staging
                        raise GalleryError(f"{root}: not built: {exc.failure}") from exc
                    if isinstance(exc, GalleryError) and str(tmp) in str(exc):
                        # a write refused in the staging folder (a full disk), which is gone:
                        # named by the library's path, which the user gave
                        raise GalleryError(str(exc).replace(str(tmp), str(root))) from exc
                    raise
            fsync_dir(root.parent)
            return report

    @classmethod
    def open_for(
        cls,
        path: str | Path,
        embedder: Embedder,
        *,
        shipped_model: bool,
        shipped_fingerprint: str | None = None,
    ) -> Gallery:
        """`open` the library for `embedder`'s features. A refusal says where the shipped
        model is involved, which the fingerprints alone do not tell: `shipped_model` (no
        --model was given) for a library built with `--model EXPORT` and used without it;
        `shipped_fingerprint` (the shipped model's) for one built with the shipped model and
        used with a --model; and the --precision of this model that built it, where one did
        (the embedder's `precision_fingerprints`)."""
        try:
            return cls.open(path, embedder=embedder)
        except ModelMismatchError as exc:
            # Both shipped: the library was built at another precision, as the error says.
            built_with_shipped = exc.library_fingerprint == shipped_fingerprint
            precisions = getattr(embedder, "precision_fingerprints", {})
            built_in = [p for p, built in precisions.items() if built == exc.library_fingerprint]
            if built_in:  # the model given, at another precision
                note = (
                    f"it holds this model's {built_in[0]} features: give --precision "
                    f"{built_in[0]} (precision= in Python)"
                )
            elif shipped_model and not built_with_shipped:
                note = SHIPPED_MODEL_NOTE
            elif built_with_shipped and not shipped_model:
                note = SHIPPED_LIBRARY_NOTE
            else:
                raise
            raise ModelMismatchError(f"{exc} ({note})", exc.library_fingerprint) from None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        embedder: Embedder | None = None,
        verify: bool = True,
        repair: bool = False,
    ) -> Gallery:
        """Open a library; with `embedder`, refuse it unless it is the library's model.

        `verify` checks the index file's checksum first (a corrupt file could crash Faiss).
        `repair` opens a library whose index file is missing or damaged, or whose Milvus
        collection cannot be read, by building the index again from the stored features (a
        write: a new generation); `repaired` then says so.
        """
        if embedder is not None:
            _check_embedder(embedder)
        model = None if embedder is None else (embedder.fingerprint, embedder.embedding_size)
        return cls._open(_library_path(path), model=model, verify=verify, repair=repair)

    @classmethod
    def _open(
        cls,
        root: Path,
        *,
        model: tuple[str, int] | None = None,
        verify: bool = True,
        repair: bool = False,
        replace_collection: bool = False,
    ) -> Gallery:
        """`open`, refused unless the library holds `model`'s features (fingerprint, embedding
        size); `replace_collection` is `create`'s, for the new library it opens."""
        _refuse_non_utf8_root(root)
        store = _open_store(root)
        backend: Backend | None = None
        try:
            # Manifest, index file and labels of one generation, even while another process
            # publishes the next one (and deletes this one's index file).
            with store.reading():
                manifest = _committed_manifest(root, store, model)
                backend = open_backend(
                    root, manifest, store, verify, repair, replace_collection=replace_collection
                )
                gallery = cls(root, store, backend, model)
            gallery._finish_open()
            if gallery._backend.damaged:
                gallery.rebuild()
                gallery.repaired = True
        except BaseException:
            if backend is not None:  # a Milvus Lite server would keep its file locked
                backend.close()
            store.close()
            raise
        return gallery

    def close(self) -> None:
        """Release the index and the database; every later call but `close` is refused."""
        if self._closed:
            return
        self._check_usable()
        with self._swap.write():  # after the searches under way
            self._closed = True
            self._backend.close()
        self._store.close()

    def stop_waiting(self) -> None:
        """Have reads and writes that another process's lock on the library keeps waiting
        give up (a LibraryBusyError; a write changes nothing), now and from now on: for a
        process that is closing, such as a server told to stop. Any thread may call it."""
        self._store.stop_waiting()

    def discard(self) -> None:
        """Close the library and delete its index where that is kept outside its folder (a
        Milvus collection on a server, or in a Lite file elsewhere): for a caller that then
        deletes the folder, such as a build that failed, so that no vectors outlive it."""
        self._check_usable()
        with self._swap.write():
            self._backend.discard()
        self.close()

    def __enter__(self) -> Gallery:
        self._check_usable(sqlite=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<Gallery {str(self.root)!r}, closed>"
        m = self.manifest
        return (
            f"<Gallery {str(self.root)!r}: {len(self._id_labels[0])} images, {m.backend} "
            f"{m.index_type}, {m.metric}, {m.embedding_dim}-d>"
        )

    def __len__(self) -> int:
        self._check_usable(sqlite=False)
        return len(self._id_labels[0])

    def check_embedder(self, embedder: Embedder) -> None:
        """A ModelMismatchError unless `embedder` gives this library's features (its model
        fingerprint and embedding size)."""
        self._check_usable(sqlite=False)
        _check_embedder(embedder)
        self.manifest.check_model(embedder.fingerprint, embedder.embedding_size, str(self.root))

    # ----------------------------------------------------------------------------- search

    def search(
        self, vectors: np.ndarray, k: int = 5, min_score: float | None = None
    ) -> SearchResult:
        """The k most similar gallery images per query vector (a float array [Q, D] or [D]),
        k at most the images the library holds; any thread may search.

        A query row with NaN or inf is refused (a GalleryError naming the rows: the model
        that made it is broken). In a library that normalises its features, an all-zero
        row has no direction, so no similarity to any image: it gets no hits (padding), so
        that one such crop does not fail a whole batch of recognitions."""
        self._check_usable(sqlite=False)
        # Faiss takes a Python int only: numpy's integers fail inside its bindings.
        if not is_whole_number(k) or k < 1:
            raise GalleryError(f"k: expected a whole number >= 1, got {k!r}")
        k = int(k)
        # NaN compares false with every score (all hits kept); text fails inside numpy
        if min_score is not None and (
            isinstance(min_score, bool) or not isinstance(min_score, Real) or math.isnan(min_score)
        ):
            raise GalleryError(f"min_score: expected a number, got {min_score!r}")
        queries = self._prepare(vectors)
        self._refuse_non_finite(queries, "search: query rows")  # they would rank nothing
        aimless = _without_direction(queries) if self.manifest.normalize else None
        self._swap.acquire_read()  # one generation's index and labels
        try:
            self._check_usable(sqlite=False)  # not closed while this waited
            id_labels = self._id_labels
            newest_id = int(id_labels[0][-1]) if len(id_labels[0]) else -1
            k = min(k, max(len(id_labels[0]), 1))  # this generation's images
            found = self._backend.search(queries, k, newest_id)
        finally:
            self._swap.release_read()
        scores, ids = _ties_in_id_order(*found)
        dropped = np.zeros(ids.shape, bool) if min_score is None else scores < min_score
        if aimless is not None:
            dropped |= aimless[:, None]  # else scored 0.0 against arbitrary images
        ids = np.where(dropped, -1, ids)
        scores = np.where(dropped, np.float32(-np.inf), scores)
        return SearchResult(labels=_labels_of(ids, *id_labels), scores=scores, ids=ids)

    def _prepare(
        self, vectors: np.ndarray, dim: int | None = None, normalize: bool | None = None
    ) -> np.ndarray:
        """[N, dim] contiguous float32 rows (`dim` the library's unless given), normalised
        where the library normalises unless `normalize` says otherwise."""
        dim = self.manifest.embedding_dim if dim is None else dim

        def refused(got: str) -> GalleryError:  # the message is made only when needed
            return GalleryError(
                f"{self.root}: expected a float array of shape [N, {dim}] or [{dim}], got {got}"
            )

        if isinstance(vectors, str | bytes):
            raise refused(f"the string {vectors!r:.40}")
        try:
            array = np.asarray(vectors)
            if not array.ndim:  # one number, or None
                raise TypeError
        except (TypeError, ValueError):  # ragged lists
            raise refused(f"{type(vectors).__name__} {vectors!r:.40}") from None
        # bool masks, ids or pixels are no features, yet cast quietly (complex ones losing
        # their imaginary parts); objects and text may fail inside numpy, or not
        if array.dtype.kind != "f":
            raise refused(
                f"{_DTYPE_KINDS.get(array.dtype.kind, 'non-float')} values ({array.dtype})"
            )
        if array.dtype.itemsize > 4:  # else cast to inf, and refused as "NaN or inf" rows
            beyond = np.isfinite(array) & (np.abs(array) > np.finfo(np.float32).max)
            if beyond.any():
                largest = np.abs(array[beyond]).max()
                raise refused(f"{largest:.3g}, beyond float32's range, which features are kept in")
        array = array.astype(np.float32, copy=False)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[1] != dim:
            raise refused(f"shape {list(np.shape(vectors))}")
        if self.manifest.normalize if normalize is None else normalize:
            array = l2_normalize(array)
        return np.ascontiguousarray(array)

    def _refuse_non_finite(self, rows: np.ndarray, named: str) -> None:
        """A GalleryError naming the rows (`named`: how the message calls them) that hold
        NaN or inf; one check of the whole array when there are none."""
        if not np.isfinite(rows).all():
            bad = np.flatnonzero(~finite_rows(rows))
            raise GalleryError(f"{self.root}: {named} {_rows(bad)} contain NaN or inf")

    def _stored_features(
        self, features: np.ndarray, where: str, dim: int | None = None
    ) -> np.ndarray:
        """Features as stored and indexed (`dim`: their size, the library's by default),
        refused if any row has NaN or inf, or, in a library that normalises, no direction."""
        raw = self._prepare(features, dim, normalize=False)
        self._refuse_non_finite(raw, f"{where}: rows")
        if not self.manifest.normalize:
            return raw
        vectors = l2_normalize(raw)
        bad = np.flatnonzero(_without_direction(vectors))
        if len(bad):
            raise GalleryError(
                f"{self.root}: {where}: rows {_rows(bad)} are all zero or cannot be "
                "normalised: a library that normalises its features needs vectors with a direction"
            )
        return vectors

    # ----------------------------------------------------------------------------- writes

    def _write(
        self,
        mutate: Callable[[], tuple[Change | None, T]],
        manifest_updates: Callable[[Manifest], dict[str, Any]] | None = None,
    ) -> T:
        """Run `mutate` and stage the index in one transaction; publish after the commit.
        A `mutate` that changed nothing returns no Change: the generation stays.
        `manifest_updates` gives the manifest fields to change from the manifest as
        committed, which another process may have written since this one loaded it."""
        try:
            with self._store.transaction():
                committed = _committed_manifest(self.root, self._store, None)
                if committed.generation != self.manifest.generation:
                    self._reload()  # another process wrote since we opened
                    committed = self.manifest
                change, result = mutate()
                if change is None:
                    return result
                # The ids and labels as committed, from the change (this process's are the
                # committed ones before it): reading them all again takes 0.2 s per 200k rows
                id_labels = _edited(self._id_labels, change)
                crash_point("rows-written")
                manifest = replace(
                    committed,
                    generation=committed.generation + 1,
                    updated_at=now(),
                    **(manifest_updates(committed) if manifest_updates else {}),
                )
                manifest.index_state = self._backend.stage(change, manifest)
                self._store.write_manifest(manifest)
                crash_point("before-commit")
        except BaseException:
            self._backend.discard_staged()  # e.g. the index file staged for the rolled-back change
            self._reload()  # the in-memory index may hold the rolled-back change
            raise
        crash_point("after-commit")
        with self._swap.write():
            self._backend.publish(manifest)
            # The backend's, not the file's: another process may have committed since
            self.manifest = self._backend.manifest
            self._id_labels = id_labels
            self.last_change = change
        return result

    def replaced(self) -> bool:
        """Whether the library's database at its path is no longer the file this object
        opened: deleted, or the library built again there (`rm -r LIB`, `index build --out
        LIB`). Reads go on from the file opened, which no other process writes any more,
        and writes are refused."""
        return _file_identity(self.root / LIBRARY_FILE) != self._database

    def database_on_disk(self) -> tuple[int, int, int] | None:
        """The database file now at the library's path as (device, inode, change time in
        ns), None where there is none: whether a library there is still the one that failed
        to open a moment ago, say."""
        try:
            stat = (self.root / LIBRARY_FILE).stat()
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino, stat.st_ctime_ns

    def open_replacement(self) -> Gallery:
        """The library now at this one's path, once `replaced()`: opened as this one was, so
        refused unless it holds the same model's features (GalleryError where there is none
        yet). This one stays open: the caller closes it once it has switched."""
        return Gallery._open(self.root, model=self._model)

    def generation_on_disk(self) -> int | None:
        """The generation last committed by any process (None: the manifest is gone)."""
        self._check_usable()
        latest = self._store.read_manifest()
        return None if latest is None else latest.generation

    def stale(self) -> bool:
        """Whether another process has written the library since this one last read it."""
        return self.generation_on_disk() != self.manifest.generation

    def refresh(self) -> bool:
        """Catch up with other processes' writes; True if there were any.

        A library opened with an embedder refuses to take another model's re-embedding.
        """
        self._check_usable()
        if not self.stale():
            return False
        self._reload()
        return True

    def _reload(self) -> None:
        """Load the committed generation, or catch up with it in place where the backend
        can (a Faiss index whose file the writes since kept). Where the backend allows, the
        new one opens before the old one closes, so a generation that cannot load leaves
        this one serving."""
        self.last_change = None
        with self._store.reading():  # one generation's manifest, index file and labels
            manifest = _committed_manifest(self.root, self._store, None)
            if self._model is not None:  # it was opened for this model, which it held then
                _refuse_reembedded(self.root, manifest, self._model)
            id_labels = self._store.id_labels()
            old = self._backend
            catch_up = old.follow(manifest)
            if catch_up is not None:
                with self._swap.write():
                    catch_up()
                    self.manifest, self._id_labels = manifest, id_labels
            elif old.opens_beside_itself:
                backend = open_backend(self.root, manifest, self._store, verify=True)
                with self._swap.write():
                    self._backend, self.manifest, self._id_labels = backend, manifest, id_labels
                old.close()
            else:
                with self._swap.write():
                    old.close()
                    try:
                        backend = open_backend(self.root, manifest, self._store, verify=True)
                    except BaseException:
                        self._reopen_after_failed_load()
                        raise
                    self._backend, self.manifest, self._id_labels = backend, manifest, id_labels
        self._finish_open()

    def _reopen_after_failed_load(self) -> None:
        """Searchable again after a failed reload of a backend that had to close first: its
        index may be half rebuilt, so it is rebuilt from the stored rows (read under the
        same lock), with their labels; the manifest stays, so the library is still stale
        and the next refresh tries the new generation again. If even that fails, searches
        raise the backend's error rather than answer from a broken index."""
        unsynced = replace(self.manifest, index_state={})
        try:
            self._backend = open_backend(self.root, unsynced, self._store, verify=False)
        except Exception:
            return
        self._id_labels = self._store.id_labels()

    def _finish_open(self) -> None:
        """The backend's writes after opening (outside the read lock), and their manifest."""
        self._backend.finish_open()
        self.manifest = self._backend.manifest

    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        paths: Sequence[str | Path] | None = None,
        hashes: Sequence[str | None] | None = None,
        allow_duplicates: bool = False,
    ) -> AddReport:
        """Add vectors with labels; rows whose content hash is already present are skipped.

        A vector with NaN or inf, or all zero in a library that normalises (it has no
        direction), is refused, and then nothing is added; so are all of them (a
        ModelMismatchError) where another process has re-embedded the library with another
        model since this object loaded it: they are the features of the model it had.
        """
        self._check_usable()
        vectors = self._stored_features(features, "add")
        count = len(vectors)
        labels = _listed(labels, "labels", "add")
        paths = _path_texts(paths, count)
        hashes = _listed(hashes, "hashes", "add") if hashes is not None else [None] * count
        # Each list that is off, with its length: 'features, labels, paths and hashes differ
        # in length' named paths and hashes that were never given
        given = {"labels": labels, "paths": paths, "hashes": hashes}
        wrong = [
            f"{len(values)} in {name}" for name, values in given.items() if len(values) != count
        ]
        if wrong:
            raise GalleryError(
                f"add: {count} feature rows, but {' and '.join(wrong)}; give one for each row"
            )
        labels = [_stored_label(label, "add") for label in labels]
        unstorable = [path for path in paths if not self._storable(path)]
        if unstorable:
            raise GalleryError(f"add {unstorable[0]!r}: {NAME_NOT_UTF8}")
        # The model the features were made for: the library's as this object loaded it
        model = (self.manifest.model_fingerprint, self.manifest.embedding_dim)

        def mutate() -> tuple[Change | None, AddReport]:
            # Another process may have re-embedded the library with another model since:
            # these features would be mixed into its new ones (or fail inside Faiss)
            _refuse_reembedded(self.root, self.manifest, model)
            keep = list(range(count))
            duplicates: list[str] = []
            if not allow_duplicates:
                seen = self._store.existing_hashes([h for h in hashes if h is not None])
                keep = []
                for row, digest in enumerate(hashes):
                    if digest is not None and digest in seen:
                        duplicates.append(paths[row] or f"row {row}")
                    else:
                        keep.append(row)
                        if digest is not None:
                            seen.add(digest)
            if not keep:
                return None, AddReport(ids=np.zeros(0, np.int64), duplicates=duplicates)
            stamp = now()
            rows = [
                NewImage(self._stored_path(paths[i]), labels[i], hashes[i], stamp) for i in keep
            ]
            ids = self._store.insert(rows, vectors[keep])
            labels_added = [row.label for row in rows]
            change = Change(added_ids=ids, added=vectors[keep], added_labels=labels_added)
            return change, AddReport(ids=ids, duplicates=duplicates)

        return self._write(mutate)

    def add_files(
        self,
        embedder: Embedder,
        items: Iterable[GalleryItem],
        batch_size: int = 32,
        progress: bool | ImageProgress = False,
        allow_duplicates: bool = False,
    ) -> AddReport:
        """Embed image files and add them in one write (all or nothing); unreadable files
        are reported, not fatal. `progress`: draw a bar, or advance the one given."""
        self._check_usable()
        self.check_embedder(embedder)  # before any file is read
        wanted = progress if isinstance(progress, bool) else not progress.disable
        checked = self.check_files(items, allow_duplicates, progress=wanted)
        report = checked.report()
        report.include(
            self.add_checked_files(embedder, checked.files, batch_size, progress, allow_duplicates)
        )
        return report

    def check_files(
        self, items: Iterable[GalleryItem], allow_duplicates: bool = False, progress: bool = False
    ) -> FilesToAdd:
        """Read each file's content hash, leaving out what an add of `items` does not
        embed: files that cannot be read (failures), and content the library has or that
        `items` listed before (duplicates; under another label, a failure that says which
        label it keeps). `add_checked_files` adds the rest, in one write or in parts (each
        its own write: an add that keeps what it did when stopped). `progress`: draw a bar
        over the hashing, for HASH_BAR_MIN_FILES files or more (each file is read whole)."""
        self._check_usable()
        items = gallery_items(items, "add")
        unstorable = {index for index, item in enumerate(items) if not self._storable(item.path)}
        failures = [(str(items[index].path), NAME_NOT_UTF8) for index in sorted(unstorable)]
        items = [item for index, item in enumerate(items) if index not in unstorable]
        # As each label is stored, checked before any file is read
        labels = [_stored_label(item.label, f"add {item.path}") for item in items]
        digests, unreadable = _file_hashes([item.path for item in items], progress)
        failures += unreadable
        readable = [
            (replace(item, label=label), digest)
            for item, label, digest in zip(items, labels, digests, strict=True)
            if digest is not None
        ]
        duplicates: list[str] = []
        if not allow_duplicates:
            present = self.first_with_hashes([digest for _, digest in readable])
            unique, seen = [], set(present)
            listed: dict[str, GalleryItem] = {}  # this call's first item of each content
            for item, digest in readable:
                first = listed.get(digest)
                stored_id, stored_label = present.get(digest, (None, item.label))
                if first is not None and first.label != item.label:  # one photo, two labels
                    # One file listed twice was 'the same photo as' itself
                    where = (
                        "listed before"
                        if first.path == item.path
                        else f"the same photo as {first.path}"
                    )
                    failures.append(
                        (str(item.path), f"{where}, labelled '{first.label}'; it keeps that label")
                    )
                elif normal_form(stored_label) != item.label:  # a mistake, or meant to move it
                    failures.append(
                        (
                            str(item.path),
                            f"the library has this photo as image {stored_id}, labelled "
                            f"'{stored_label}'; it keeps that label (to label it "
                            f"'{item.label}' instead, remove it, `shitu index remove "
                            f"{shlex.quote(str(self.root))} --id {stored_id}`, and add it again)",
                        )
                    )
                elif digest in seen:
                    duplicates.append(str(item.path))
                else:
                    seen.add(digest)
                    listed[digest] = item
                    unique.append((item, digest))
            readable = unique
        return FilesToAdd(readable, duplicates, failures)

    def add_checked_files(
        self,
        embedder: Embedder,
        files: Sequence[tuple[GalleryItem, str]],
        batch_size: int = 32,
        progress: bool | ImageProgress = False,
        allow_duplicates: bool = False,
    ) -> AddReport:
        """Embed files that `check_files` gave (all, or a part of them) and add them in one
        write; unreadable ones are reported, and content stored meanwhile is skipped."""
        self._check_usable()
        self.check_embedder(embedder)
        paths = [str(item.path) for item, _ in files]
        if not paths:
            return AddReport(np.zeros(0, np.int64))
        result = embedder.extract_files(paths, batch_size=batch_size, progress=progress)
        failed = {path for path, _ in result.failures}
        embedded = [(item, digest) for item, digest in files if str(item.path) not in failed]
        if len(embedded) != len(result.features):
            raise GalleryError(
                f"embedder returned {len(result.features)} features for {len(embedded)} images"
            )
        # A file the model gave NaN or inf is named, as one that cannot be read is: refused
        # by `add`, it failed the whole add, naming a row of the batch
        usable = finite_rows(result.features)
        broken = [str(item.path) for (item, _), ok in zip(embedded, usable, strict=True) if not ok]
        embedded = [pair for pair, ok in zip(embedded, usable, strict=True) if ok]
        report = self.add(
            result.features[usable],
            [item.label for item, _ in embedded],
            [str(item.path) for item, _ in embedded],
            [digest for _, digest in embedded],
            allow_duplicates=allow_duplicates,
        )
        report.failures = list(result.failures) + [(path, NOT_FINITE) for path in broken]
        return report

    def remove(self, ids: Iterable[int] = (), labels: Iterable[str] = ()) -> np.ndarray:
        """Remove images by id and/or every image of the given labels; returns removed ids.
        `ids` may be the arrays that `add` and `search` return. Given none, it writes
        nothing (the library keeps its generation)."""
        self._check_usable()
        ids, labels = _image_ids(ids, "remove"), _label_names(labels, "remove")
        if not ids and not labels:  # else a new generation, which other processes reload
            return np.zeros(0, np.int64)

        def mutate() -> tuple[Change, np.ndarray]:
            unknown = [label for label in labels if not self._store.ids_with_labels([label])]
            if unknown:
                hint = did_you_mean(unknown[0], list(self._store.label_counts()))
                named = first_few([f"'{label}'" for label in unknown], SHOWN_FILES)
                raise GalleryError(f"{self.root}: no images labelled {named}{hint}")
            target = sorted(set(ids) | set(self._store.ids_with_labels(labels)))
            removed = self._store.delete(target)
            missing = sorted(set(target) - set(removed.tolist()))
            if missing:
                raise GalleryError(f"{self.root}: no images with ids {missing[:10]}")
            return Change(removed_ids=removed), removed

        return self._write(mutate)

    def relabel(self, old: str, new: str, merge: bool = False) -> int:
        """Rename a label; returns how many images it had. Renaming onto a label that has
        images merges the two, which cannot be told apart afterwards: only with `merge`.
        Renaming a label to itself writes nothing (the library keeps its generation)."""
        self._check_usable()
        (old,) = _label_names([old], "relabel")
        new = _stored_label(new, "relabel")

        def mutate() -> tuple[Change | None, int]:
            ids = self._store.ids_with_labels([old])
            if not ids:
                hint = did_you_mean(old, list(self._store.label_counts()))
                raise GalleryError(f"{self.root}: no images labelled '{old}'{hint}")
            if self._store.stored_forms([old]) == [new]:  # already so: no new generation
                return None, len(ids)
            if not merge and new != normal_form(old) and self._store.ids_with_labels([new]):
                raise GalleryError(
                    f"{self.root}: label '{new}' already has images; renaming '{old}' onto it "
                    "would merge the two labels (allow it with merge, `--merge` in the CLI)"
                )
            relabelled = self._store.relabel(old, new)
            return Change(relabelled_ids=relabelled, relabelled_to=new), len(relabelled)

        return self._write(mutate)

    def rebuild(self, index_type: str | None = None, **backend_options: Any) -> dict[str, Any]:
        """Rebuild the index from the stored features, optionally as another type and with
        other `backend_options` (the names `create` takes, e.g. `ef_search=128`), but for
        the Milvus `uri` and `collection`: the index is rebuilt where it is. The stored
        settings (as last committed, by any process) that the new type does not read (an
        IVF `nprobe` on a rebuild to HNSW32) are dropped, and returned for the caller to
        tell; one given that it does not read is refused, as `create` refuses it, and one
        given as None keeps the value stored."""
        self._check_usable()
        backend_options = given_options(backend_options)  # None: the value stored stays
        Manifest.check_backend_options(self.manifest.backend, backend_options)
        moved = [name for name in LOCATION_OPTIONS if name in backend_options]
        if moved:  # the manifest would name a place the index was not built in
            raise GalleryError(
                f"{self.root}: rebuild keeps the index where it is; {' and '.join(moved)} "
                "can only be chosen when a library is made (build a new one)"
            )
        # An unknown type given, or a setting it never reads, is refused now, not after
        # waiting for the write lock
        if index_type is not None:
            Manifest.check_index_type(index_type)
            Manifest.check_typed_options(index_type, backend_options)
        dropped: dict[str, Any] = {}

        def settings(committed: Manifest) -> dict[str, Any]:
            """The type and settings, from those committed: decided from this object's
            copy, a rebuild by another process since was undone (its settings lost, or
            ones its type never reads kept)."""
            new_type = index_type or committed.index_type
            if index_type is None and new_type in INDEX_TYPES:  # the type as committed
                Manifest.check_typed_options(new_type, backend_options)
            stored = committed.backend_options
            dropped.update(unread_options(new_type, stored))  # those given: read, as checked
            kept = {name: value for name, value in stored.items() if name not in dropped}
            return {"index_type": new_type, "backend_options": {**kept, **backend_options}}

        self._write(lambda: (Change(rebuild=True), None), settings)
        return dropped

    def reembed(
        self,
        embedder: Embedder,
        batch_size: int = 32,
        progress: bool = False,
        moved: Sequence[tuple[str | Path, str | Path]] = (),
    ) -> int:
        """Re-extract every image with a new model and rebuild; all or nothing. Images that
        another process adds or removes meanwhile (a running `shitu serve`, say) are
        followed: those added are embedded in a short further round, those removed dropped,
        rather than failing the whole re-embedding at its end. An empty library (every
        image removed) just takes the new model, so that images can be added with it. Each
        image's content hash is recorded again with its features: a file changed in place
        is the content the library now holds, so adding that content again is a duplicate.
        `moved`: (old folder, new folder) pairs, for photo folders moved since their images
        were added: an image whose file was under an old folder is read from the same place
        under the new one, and recorded there with its new features."""
        self._check_usable()
        _check_embedder(embedder)
        entries = self.entries()
        moves = self._moves(moved, entries)
        embedded: dict[int, tuple[np.ndarray, str]] = {}  # by id: the feature, content hash
        new_paths: dict[int, str] = {}  # by id: where a moved image's file is now, as stored
        for _ in range(REEMBED_CATCH_UPS + 1):
            now_at = {e.id: path for e in entries if (path := _moved_path(e.path, moves))}
            entries = [replace(e, path=now_at.get(e.id, e.path)) for e in entries]
            new_paths.update((i, self._stored_path(path)) for i, path in now_at.items())
            embedded.update(self._embed_entries(embedder, entries, batch_size, progress))

            def mutate() -> tuple[Change, int]:
                current, _ = self._store.id_labels()
                added_meanwhile = [int(i) for i in current if int(i) not in embedded]
                if added_meanwhile:
                    raise _AddedMeanwhile(added_meanwhile)
                features = np.asarray([embedded[int(i)][0] for i in current], dtype=np.float32)
                hashes = [embedded[int(i)][1] for i in current]
                self._store.replace_features(current, features, hashes)
                self._store.move_files(new_paths)  # an id removed meanwhile matches no row
                return Change(rebuild=True), len(current)

            try:
                count = self._write(
                    mutate,
                    lambda _: {
                        "model_fingerprint": embedder.fingerprint,
                        "embedding_dim": embedder.embedding_size,
                        "preprocessing": dict(embedder.preprocessing),
                    },
                )
            except _AddedMeanwhile as behind:
                entries = self.entries_with_ids(behind.ids)
                continue
            if self._model is not None:  # the library's model is the new one from now on
                self._model = (embedder.fingerprint, embedder.embedding_size)
            return count
        raise GalleryError(
            f"{self.root}: images kept being added during re-embedding (after "
            f"{REEMBED_CATCH_UPS} rounds of embedding the new ones); nothing was changed, "
            "retry when fewer images are being added"
        )

    def _moves(
        self, moved: Sequence[tuple[str | Path, str | Path]], entries: list[ImageEntry]
    ) -> list[tuple[Path, Path]]:
        """`reembed`'s `moved` pairs as full paths, the deepest old folder first (it decides
        for an image under two); refused where a new folder is not there, or where an old
        one holds no image of the library (mistyped, it would quietly move nothing)."""
        moves = []
        for pair in _listed(moved, "(old folder, new folder) pairs", "reembed"):
            try:
                if isinstance(pair, str | bytes | os.PathLike):  # one path, not a pair
                    raise TypeError
                old, new = (Path(folder).resolve() for folder in pair)
            except (TypeError, ValueError):  # not two paths
                raise GalleryError(
                    f"reembed: moved: expected (old folder, new folder) pairs, got {pair!r}"
                ) from None
            if not new.is_dir():
                raise GalleryError(f"{self.root}: moved {old} to {new}: {new} is not a folder")
            if not any(Path(e.path).is_relative_to(old) for e in entries if e.path):
                gone = gone_from([e for e in entries if file_gone(e)])
                where = f"; the files that are gone were in {gone}" if gone else ""
                raise GalleryError(
                    f"{self.root}: moved {old} to {new}: no image of the library was added "
                    f"from {old}{where}"
                )
            moves.append((old, new))
        return sorted(moves, key=lambda move: len(move[0].parts), reverse=True)

    def _embed_entries(
        self, embedder: Embedder, entries: list[ImageEntry], batch_size: int, progress: bool
    ) -> dict[int, tuple[np.ndarray, str]]:
        """The stored images' features under `embedder` and their files' content hashes, by
        id; refused, naming the ids, where an image has no file or its file cannot be read."""
        no_file = [e.id for e in entries if not e.path]
        if no_file:
            raise GalleryError(
                f"{self.root}: {len(no_file)} images were added as vectors without a file "
                f"(ids {no_file[:5]}); remove them before re-embedding"
            )
        digests, failures = _file_hashes([e.path for e in entries], progress)
        readable = [(e, digest) for e, digest in zip(entries, digests, strict=True) if digest]
        result = embedder.extract_files([e.path for e, _ in readable], batch_size, progress)
        failures += result.failures
        if failures:  # named by id: what `shitu index remove` takes
            failed = {path for path, _ in failures}
            bad = np.asarray([e.id for e in entries if e.path in failed])
            named = "; ".join(f"{path} ({reason})" for path, reason in failures[:SHOWN_FILES])
            more = len(failures) - SHOWN_FILES
            named += f"; and {more} more" if more > 0 else ""
            raise GalleryError(
                f"cannot re-embed: {len(bad)} of the {len(entries)} images could not be read, "
                f"ids {_rows(bad)}: {named}; put the files back, or say where a folder of "
                "them moved to (`--moved OLD NEW`, `moved=[(OLD, NEW)]` in Python: OLD the "
                "folder they were added from), or remove those images (`shitu index remove "
                f"{shlex.quote(str(self.root))} --id ID ...`, `remove(ids)` in Python, or "
                "`--missing` for files that are gone), and retry; nothing was changed"
            )
        usable = finite_rows(result.features)
        broken = [e for (e, _), ok in zip(readable, usable, strict=True) if not ok]
        if broken:  # by id, not by the row of `readable` that _stored_features would name
            ids = first_few([e.id for e in broken], SHOWN_FILES)
            raise GalleryError(
                f"cannot re-embed: {NOT_FINITE} for {len(broken)} of the {len(entries)} "
                f"images, ids {ids}: {first_few([e.path for e in broken], SHOWN_FILES)}; "
                "nothing was changed"
            )
        features = self._stored_features(result.features, "re-embed", embedder.embedding_size)
        return {
            entry.id: (row, digest) for (entry, digest), row in zip(readable, features, strict=True)
        }

    # ----------------------------------------------------------------------------- reading

    def entries(self, label: str | None = None) -> list[ImageEntry]:
        """The stored images (by id), each with the full path of its file."""
        self._check_usable()
        return _full_entries(self.root, self._store.entries(label))

    def entries_with_ids(self, ids: Iterable[int]) -> list[ImageEntry]:
        """The stored images with these ids, as `entries` gives them: say the rows a write
        added, for a listing that follows the writes rather than reading every row again."""
        self._check_usable()
        return _full_entries(self.root, self._store.entries_with_ids(_image_ids(ids, "entries")))

    def stored_hashes(self, hashes: Sequence[str]) -> set[str]:
        """Which of these content hashes the library's images have."""
        self._check_usable()
        return self._store.existing_hashes(hashes)

    def first_with_hashes(self, hashes: Sequence[str]) -> dict[str, tuple[int, str]]:
        """For each of these content hashes the library's images have, the id and label of
        the first image with it: where an add of that content under another label would
        say it is there."""
        self._check_usable()
        return self._store.first_with_hashes(hashes)

    def _storable(self, path: str | Path) -> bool:
        """Whether the library can record a file's path: it keeps paths as UTF-8 text,
        which a file name in another encoding (a legacy code page's bytes, which Python
        gives as lone surrogates) cannot be written in."""
        try:
            self._stored_path(str(path)).encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    def _stored_path(self, path: str) -> str:
        """How a file's path is stored: relative to the library folder for files inside it
        (the server's uploads), so that the folder moved or copied whole still finds them;
        absolute for the rest (relative paths are taken from the working directory)."""
        if not path:
            return path
        full = Path(path).resolve()
        try:
            return full.relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(full)

    def label_counts(self) -> dict[str, int]:
        """Images per label."""
        self._check_usable()
        return self._store.label_counts()

    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored ids and (normalised) features, as indexed."""
        self._check_usable()
        return self._store.features(self.manifest.embedding_dim)

    def stats(self) -> dict[str, Any]:
        """What `shitu index stats` prints, as JSON-ready values: images, labels, model
        fingerprint, dimension, metric, backend and index type, generation, times."""
        self._check_usable(sqlite=False)
        ids, labels = self._id_labels
        return _stats(self.root, self.manifest, len(ids), len(set(labels.tolist())))

    def verify(self) -> list[str]:
        """Everything wrong with the library (empty list when healthy), as last committed:
        other processes' writes are loaded first (a copy that lags them is not damaged), and
        none commits during the checks."""
        self._check_usable()
        problems = self._store.integrity_problems()  # the file's pages, whatever they hold
        while True:
            try:
                self.refresh()
            except GalleryError as exc:  # the committed generation cannot be loaded
                return [*problems, str(exc)]
            with self._store.reading():
                if not self.stale():  # else another write committed meanwhile: load it too
                    return problems + self._generation_problems()

    def _generation_problems(self) -> list[str]:
        """Disagreements between the stored rows and the loaded index and labels."""
        problems = []
        try:
            ids, features = self._store.features(self.manifest.embedding_dim)
        except GalleryError as exc:
            return [str(exc)]
        if not np.isfinite(features).all():
            problems.append("stored features contain NaN or inf")
        if not np.array_equal(ids, self._id_labels[0]):
            problems.append("label cache is out of date (reopen the library)")
        return problems + self._backend.problems()


class _AddedMeanwhile(Exception):
    """Raised inside a re-embedding's write: images were added since its last round."""

    def __init__(self, ids: list[int]) -> None:
        super().__init__(f"{len(ids)} images added meanwhile")
        self.ids = ids


def _library_path(path: str | Path) -> Path:
    """`path` as a Path, or a GalleryError naming what was given instead (`is_given_path`,
    a URL, which as a Path is the missing folder `https:/host/lib`)."""
    if not is_given_path(path):
        raise GalleryError(f"expected a gallery library's path, got {path!r}")
    refuse_url(path, "gallery libraries", GalleryError)
    return expanded_path(path)


def _check_writable_place(root: Path) -> None:
    """Make the folders the new library `root` goes in and check they can be written in
    (`check_writable`), refused as a GalleryError: a file in the way, no permission or a
    read-only disk came out of create and build as a DataError, missed by a caller that
    catches the GalleryError everything else they refuse with is."""
    try:
        check_writable(root.parent, str(root))
    except DataError as exc:
        raise GalleryError(str(exc)) from None


def _into_place(staged: Path, root: Path) -> None:
    """Rename a library written whole in `staged` to `root`; a GalleryError where another
    process made one there since `root` was checked (an OSError that named the staging
    folder, from `create`), or naming the system's reason where the rename failed
    otherwise (no permission, `root` a mount point), which is no library made meanwhile."""
    try:
        os.replace(staged, root)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another build or create finished first
            raise GalleryError(
                f"{root}: already exists (built meanwhile by another process?): {exc.strerror}"
            ) from None
        raise GalleryError(
            f"{root}: cannot move the new library into place ({exc.strerror or exc})"
        ) from None


def _refuse_non_utf8_root(root: Path) -> None:
    """Faiss and Milvus are handed the library's files by their full paths."""
    refuse_non_utf8_path(root.resolve(), "the library's path", "Faiss and Milvus", GalleryError)


def _file_hashes(
    paths: Sequence[str | Path], progress: bool
) -> tuple[list[str | None], list[tuple[str, str]]]:
    """Each file's content hash (None where it cannot be read), and (path, reason) for
    those. `progress`: a `hashing` bar for HASH_BAR_MIN_FILES files or more (each file is
    read whole, which on a slow disk takes a while before anything is embedded)."""
    from shitu.progress import ImageProgress

    digests: list[str | None] = []
    failures: list[tuple[str, str]] = []
    with ImageProgress(len(paths), progress and len(paths) >= HASH_BAR_MIN_FILES, "hashing") as bar:
        for path in paths:
            try:
                digests.append(file_sha256(Path(path), "an image file"))
                bar.update(1)
            except OSError as exc:
                digests.append(None)
                failures.append((str(path), unreadable_reason(path, exc)))
                bar.skip()
    return digests, failures


def _moved_path(path: str, moves: list[tuple[Path, Path]]) -> str | None:
    """Where the file at `path` is after `moves` (Gallery._moves'), None if none moved it."""
    for old, new in moves if path else ():
        if Path(path).is_relative_to(old):
            return str(new / Path(path).relative_to(old))
    return None


def file_gone(entry: ImageEntry) -> bool:
    """Whether a stored image had a file that is no longer where it was added from."""
    return bool(entry.path) and not Path(entry.path).exists()


def gone_from(gone: Sequence[ImageEntry]) -> str:
    """The folders that images whose files are gone were added from, for a message: the
    first few, and how many more ('' for none). A folder on a disk that is not mounted, say,
    is recognised there before those images are removed."""
    folders = sorted({str(Path(entry.path).parent) for entry in gone})
    more = f" and {len(folders) - SHOWN_FILES} more folders" if len(folders) > SHOWN_FILES else ""
    return ", ".join(folders[:SHOWN_FILES]) + more


def _file_identity(path: Path) -> tuple[int, int] | None:
    """The file at `path` (device and inode), None where there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _edited(
    id_labels: tuple[np.ndarray, np.ndarray], change: Change
) -> tuple[np.ndarray, np.ndarray]:
    """Ids (ascending) and labels after `change`, as new arrays (searches may hold the old
    ones). Added ids come last: AUTOINCREMENT gives each new row an id above any before."""
    ids, labels = id_labels
    if len(change.removed_ids):
        kept = ~np.isin(ids, change.removed_ids)
        ids, labels = ids[kept], labels[kept]
    if len(change.relabelled_ids):
        labels = labels.copy()
        labels[np.searchsorted(ids, change.relabelled_ids)] = change.relabelled_to
    if len(change.added_ids):
        added = np.empty(len(change.added_ids), dtype=object)
        added[:] = list(change.added_labels)
        ids, labels = np.concatenate([ids, change.added_ids]), np.concatenate([labels, added])
    return ids, labels


def _ties_in_id_order(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's hits by score, hits of equal score (copies of one photo, say, under two
    labels) by id: the image added first comes first. Faiss returns such ties last added
    first and Milvus in no set order, so the best label depended on the backend."""
    order = np.lexsort((ids, -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def _labels_of(hits: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The labels of hit ids, given all stored `ids` (ascending) and their `labels`."""
    if not len(ids):
        return np.full(hits.shape, "", dtype=object)
    pos = np.searchsorted(ids, hits).clip(0, len(ids) - 1)
    found = labels.take(pos)
    found[ids.take(pos) != hits] = ""  # padding (-1)
    return found


def _listed(values: Any, what: str, where: str) -> list:
    """`values` as a list; a bare string, which would be taken a character at a time (or a
    number: not a list at all), is refused."""
    if isinstance(values, str | bytes):
        raise GalleryError(f"{where}: expected a list of {what}, got the string {values!r}")
    try:
        return list(values)
    except TypeError:
        raise GalleryError(f"{where}: expected a list of {what}, got {values!r}") from None


def _image_ids(ids: Any, where: str) -> list[int]:
    """`ids` as a list of ints; anything but a whole number is refused, naming it: int()
    would take 1.5 (or True) for image 1, and remove or list an image that was not meant.
    One beyond SQLite's 64-bit integers, which no image has, is refused too: the query
    failed with an OverflowError's traceback (`index remove --id 100000000000000000000`)."""
    values = _listed(ids, "ids", where)
    for value in values:
        if not is_whole_number(value):
            raise GalleryError(
                f"{where}: an image id is a whole number, got {type(value).__name__} {value!r}"
            )
        if not -(2**63) <= int(value) < 2**63:
            raise GalleryError(
                f"{where}: no image has id {value}, beyond the largest a library gives "
                f"({2**63 - 1})"
            )
    return [int(v) for v in values]


def _path_texts(paths: Any, count: int) -> list[str]:
    """`add`'s paths as text, as its report names them ('' for each of `count` rows where
    none are given); one that is no path is refused, naming it: None failed as a database
    constraint, a number inside pathlib."""
    if paths is None:
        return [""] * count
    texts = []
    for path in _listed(paths, "paths", "add"):
        if not isinstance(path, str | os.PathLike):
            raise GalleryError(
                f"add: a path is text ('' for none), got {type(path).__name__} {path!r}"
            )
        texts.append(os.fspath(path))
    return texts


def _label_names(labels: Any, where: str) -> list[str]:
    """`labels` to look up, as a list of text: a whole number is its decimal text, as
    `check_label` stores it; anything else (None) is refused, naming it, where it failed
    inside the did-you-mean hint of an unknown label."""
    names = []
    for label in _listed(labels, "labels", where):
        if is_whole_number(label):
            label = str(int(label))
        if not isinstance(label, str):
            raise GalleryError(f"{where}: a label is text, got {type(label).__name__} {label!r}")
        names.append(label)
    return names


def _check_embedder(embedder: object) -> None:
    """A GalleryError unless `embedder` is a loaded model: its folder's path, or None,
    failed on an AttributeError ("'PosixPath' object has no attribute 'embedding_size'")."""
    how = "a loaded model, shitu.inference.FeatureExtractor.load(model_dir)"
    if isinstance(embedder, str | os.PathLike):
        raise GalleryError(f"embedder: expected {how}, got the path {os.fspath(embedder)!r}")
    if not all(
        hasattr(embedder, name) for name in ("embedding_size", "fingerprint", "extract_files")
    ):
        raise GalleryError(f"embedder: expected {how}, got {type(embedder).__name__}")


def gallery_items(items: Any, where: str) -> list[GalleryItem]:
    """`items` as a list, each a GalleryItem: a generator is read once (its items are gone
    by the second look at them), and a `(path, label)` pair or a path alone would fail on a
    missing attribute that says nothing of what to pass."""
    made_by = "shitu.index.collect_items(sources) makes them from folders and label files"
    listed = _listed(items, f"GalleryItem(path, label)s ({made_by})", where)
    for item in listed:  # (a None among them is named too)
        if not isinstance(item, GalleryItem):
            raise GalleryError(
                f"{where}: expected GalleryItem(path, label)s ({made_by}), got "
                f"{type(item).__name__} {item!r:.80}"
            )
        if not isinstance(item.path, str | os.PathLike):  # else failed inside pathlib
            raise GalleryError(f"{where}: {item!r:.80}: its path is not a path")
    return listed


def _without_direction(normalised: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of `normalised` (l2_normalize's output) that are not of unit
    length: all zero, or too small to normalise. A unit row's absolute values sum to >= 1."""
    return ~(np.abs(normalised).sum(axis=1) > 0.5)


def _rows(rows: np.ndarray, shown: int = 10) -> str:
    """Row numbers for a message: the first `shown`, and how many more."""
    return first_few(rows.tolist(), shown)


def _stored_label(label: str, where: str) -> str:
    """`check_label`, its refusal a GalleryError that says which operation was refused."""
    try:
        return check_label(label)
    except BadLabelError as exc:
        raise GalleryError(f"{where}: {exc}") from None
