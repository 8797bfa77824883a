"""What the HTTP layer calls: recognition, embedding and gallery edits, loaded once per process.

Model calls go through the inference thread (`MicroBatcher`); SQLite and index writes go
through the shared library's thread. Both hand back results to the request that asked.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shitu.data.transforms.ops import UnreadableImageError
from shitu.errors import did_you_mean
from shitu.fileio import check_writable, write_atomically
from shitu.index import INDEX_TYPES, Gallery
from shitu.index.backends import UnsupportedIndexError
from shitu.index.gallery import NOT_FINITE
from shitu.index.labels import BadLabelError, normal_form
from shitu.index.labels import check_label as check_stored_label
from shitu.index.metadata import ImageEntry
from shitu.pipeline import PipelineConfig, Recognition, Recognizer
from shitu.serving.batching import BatchObserver, MicroBatcher
from shitu.serving.errors import BadRequest, Conflict, NotFound
from shitu.serving.images import SUFFIXES, thumbnail_jpeg, thumbnail_pixels
from shitu.serving.library import SharedLibrary
from shitu.serving.settings import ServeSettings
from shitu.vectors import finite_rows

logger = logging.getLogger(__name__)
MAX_LABEL_LENGTH = 200
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")  # what an upload's name keeps in its file name
MAX_NAME = 60


@dataclass(frozen=True)
class StoredElsewhere:
    """An upload the library has under another label: the upload's name, and the id and
    label of the image that holds its content."""

    name: str
    image_id: int
    label: str


@dataclass(frozen=True)
class AddOutcome:
    added: list[ImageEntry]
    duplicates: list[str]  # upload names whose content the library already holds
    elsewhere: list[StoredElsewhere] = field(default_factory=list)  # of those, other labels'


def check_label(label: str) -> str:
    """A label as the library stores it (`shitu.index.labels.check_label`), short enough for a
    request."""
    try:
        label = check_stored_label(label)
    except BadLabelError as exc:
        raise BadRequest(str(exc)) from None
    if len(label) > MAX_LABEL_LENGTH:
        raise BadRequest(f"the label is longer than {MAX_LABEL_LENGTH} characters")
    return label


class RecognitionService:
    """The recogniser (detector, embedding model, gallery) behind the HTTP API.

    Use as a context manager, or call `close()`: it stops the inference thread and closes
    the model, detector and library that it opened.
    """

    def __init__(
        self,
        config: PipelineConfig,
        settings: ServeSettings,
        observe_batch: BatchObserver | None = None,
    ) -> None:
        self.settings = settings
        self.library = SharedLibrary()
        recognizer: Recognizer | None = None
        try:
            # Built on the library's thread, so the gallery's SQLite connection belongs to it.
            recognizer = self.library.run(lambda: Recognizer.from_config(config))
            self.library.attach(recognizer.gallery)
            # images added over HTTP go here: refused now, not as a failure of each upload
            check_writable(settings.upload_dir, "the upload folder (--upload-dir)")
            self.batcher = MicroBatcher(
                {"recognize": recognizer.recognize_batch, "extract": self._embed},
                settings.max_batch,
                observe_batch,
            )
        except BaseException:
            self.library.close(recognizer.close if recognizer is not None else None)
            raise
        self._closing = threading.Lock()
        self._closed = False
        recognizer.gallery = self.library  # type: ignore[assignment]  # searches take its lock
        self.recognizer = recognizer
        self.extractor = recognizer.extractor
        self.upload_dir = settings.upload_dir.resolve()

    def close(self) -> None:
        """Finish the queued model calls and stop the inference thread, then close the
        recogniser (model, detector and library) on the library's thread; later calls do
        nothing (the app's shutdown and a `with` block may both close it)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self.batcher.close()
            self.library.close(self.recognizer.close)

    def __enter__(self) -> RecognitionService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- inference

    def check_image(self, name: str, pixels: np.ndarray) -> None:
        """BadRequest, as for a corrupt upload, for an image the model's preprocessing cannot
        take (one too elongated to resize its short side, say): checked before it is queued,
        as the model would refuse it there with an error that is the server's (500)."""
        try:
            self.extractor.check_size(pixels.shape[1], pixels.shape[0])
        except UnreadableImageError as exc:
            raise BadRequest(f"{name}: {exc}") from None

    def recognize(self, image: np.ndarray) -> Future[list[Recognition]]:
        return self.batcher.submit("recognize", image)

    def extract(self, images: Sequence[np.ndarray]) -> list[Future[np.ndarray]]:
        """One future per image: its L2-normalised embedding of the whole image."""
        return [self.batcher.submit("extract", image) for image in images]

    def _embed(self, images: list[np.ndarray]) -> np.ndarray:
        return self.extractor.extract_images(images, self.recognizer.batch_size)

    # ------------------------------------------------------------------------- reading

    def image(self, image_id: int) -> ImageEntry:
        entry = self.library.snapshot.by_id.get(image_id)
        if entry is None:
            raise NotFound(f"no gallery image with id {image_id}")
        return entry

    def label_images(self, label: str) -> tuple[ImageEntry, ...]:
        entries = self.library.snapshot.by_label.get(normal_form(label))
        if entries is None:
            raise NotFound(f"no gallery images labelled '{label}'")
        return entries

    def image_file(self, image_id: int) -> str:
        """The path of the image's file, which the thumbnail methods take (looked up once
        for all of them); NotFound where the image is unknown or was added without a file."""
        entry = self.image(image_id)
        if not entry.path:
            raise NotFound(f"gallery image {image_id} was added as a vector, without a file")
        return entry.path

    def thumbnail(self, path: str, size: int) -> bytes:
        return thumbnail_jpeg(path, size, self.settings.max_pixels)

    def thumbnail_pixels(self, path: str, size: int) -> int:
        """The pixels `thumbnail` decodes (a PNG's all, a JPEG's at a reduced scale)."""
        return thumbnail_pixels(path, size, self.settings.max_pixels)

    def thumbnail_tag(self, path: str, size: int) -> str | None:
        """The thumbnail's ETag, from its file's path, inode, length and time of change (a stat,
        where making it decodes the image); None where the file cannot be read (`thumbnail`
        says why). Ids start at 1 in every library: a browser that kept another library's
        (or an earlier build's) image 1 must not be shown it for this one's."""
        try:
            stat = os.stat(path)
        except OSError:
            return None
        facts = f"{path}\0{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}\0{size}"
        return f'"{hashlib.sha256(facts.encode()).hexdigest()[:32]}"'

    # ------------------------------------------------------------------------- writing

    def add(
        self, label: str, images: Sequence[tuple[str, bytes]], features: np.ndarray
    ) -> AddOutcome:
        """Keep the encoded images' files (name, bytes) and add them with `label` and their
        embeddings (`extract`, one row each); images the library already has (same bytes)
        are skipped.

        Blocks; call from a worker thread. Takes embeddings, not pixels: nothing decoded is
        held while the write waits for others (another process's may take a minute); the
        files and rows are written on the library's thread, one write at a time.
        """
        label = check_label(label)
        if not images:
            raise BadRequest("no images to add")
        # Named as uploaded (a request holds a few): the library refused them as its rows
        usable = finite_rows(features)
        broken = [name for (name, _), ok in zip(images, usable, strict=True) if not ok]
        if broken:
            raise BadRequest(f"cannot add {', '.join(broken)}: {NOT_FINITE}; nothing was added")
        hashes = [hashlib.sha256(data).hexdigest() for _name, data in images]

        def commit() -> AddOutcome:
            stored, seen = self.library.gallery.first_with_hashes(hashes), set()
            rows, duplicates = [], []
            for row, digest in enumerate(hashes):
                (duplicates if digest in stored or digest in seen else rows).append(row)
                seen.add(digest)
            names = [images[row][0] for row in duplicates]
            elsewhere = [
                StoredElsewhere(images[row][0], *stored[hashes[row]])
                for row in duplicates
                if hashes[row] in stored and normal_form(stored[hashes[row]][1]) != label
            ]
            if not rows:
                return AddOutcome(added=[], duplicates=names, elsewhere=elsewhere)
            created: list[Path] = []
            paths = []
            try:
                for row in rows:
                    path, new = self._keep_file(*images[row], hashes[row])
                    paths.append(str(path))
                    if new:
                        created.append(path)
                report = self.library.write(
                    lambda gallery: gallery.add(
                        features[rows], [label] * len(rows), paths, [hashes[row] for row in rows]
                    )
                )
            except BaseException:
                self._drop_unlisted(created)
                raise
            if report.duplicates:  # another process added some of the content first
                self._drop_unlisted(created)
                skipped = set(report.duplicates)  # by the paths given, one per content
                listed = zip(rows, paths, strict=True)
                names += [images[row][0] for row, path in listed if path in skipped]
            by_id = self.library.snapshot.by_id
            added = [by_id[int(i)] for i in report.ids]
            return AddOutcome(added=added, duplicates=names, elsewhere=elsewhere)

        return self.library.edit(commit)

    def remove_image(self, image_id: int) -> ImageEntry:
        def commit() -> ImageEntry:
            entry = self.image(image_id)
            self.library.write(lambda gallery: gallery.remove(ids=[image_id]))
            self._forget_files([entry])
            return entry

        return self.library.edit(commit)

    def remove_label(self, label: str) -> list[int]:
        def commit() -> list[int]:
            entries = self.label_images(label)
            removed = self.library.write(lambda gallery: gallery.remove(labels=[label]))
            self._forget_files(entries)
            return [int(i) for i in removed]

        return self.library.edit(commit)

    def rename_label(self, old: str, new: str, merge: bool = False) -> int:
        """Rename; onto a label that has images only with `merge` (else a Conflict, as the
        API and `shitu index relabel` without --merge refuse it: the two cannot be told apart
        afterwards), checked with the library as it is, not as a client last listed it."""
        new = check_label(new)

        def commit() -> int:
            count = len(self.label_images(old))
            if new == normal_form(old):
                return count
            if not merge and new in self.library.snapshot.by_label:
                raise Conflict(
                    f"label '{new}' already has images: renaming '{old}' onto it would merge "
                    "the two (send merge: true to merge them)"
                )
            self.library.write(lambda gallery: gallery.relabel(old, new, merge=True))
            return count

        return self.library.edit(commit)

    def rebuild(self, index_type: str | None = None) -> dict[str, Any]:
        if index_type is not None and index_type not in INDEX_TYPES:
            raise BadRequest(
                f"unknown index type '{index_type}'{did_you_mean(index_type, list(INDEX_TYPES))}: "
                f"choose one of {', '.join(INDEX_TYPES)}"
            )

        def rebuild(gallery: Gallery) -> dict[str, Any]:
            return gallery.rebuild(index_type)

        try:
            dropped = self.library.edit(lambda: self.library.write(rebuild))
        except UnsupportedIndexError as exc:  # the request's choice, not the server's failure
            raise BadRequest(str(exc)) from None
        return {**self.library.snapshot.stats, "dropped_settings": dropped}

    # ------------------------------------------------------------------------- files

    def _keep_file(self, name: str, data: bytes, digest: str) -> tuple[Path, bool]:
        """Store an upload (atomically) as `<its name>-<hash prefix>`; returns the path and
        whether this call wrote it.

        The library holds each content once, so the hash prefix keeps names unique.
        """
        with Image.open(io.BytesIO(data)) as header:
            suffix = SUFFIXES[header.format or ""]  # `read_header` refused other formats
        stem = SAFE_NAME.sub("_", Path(name).stem)[:MAX_NAME].strip("._") or "image"
        path = self.upload_dir / f"{stem}-{digest[:16]}{suffix}"
        if path.is_file():
            return path, False
        write_atomically(path, lambda tmp: tmp.write_bytes(data), durable=True)
        return path, True

    def _drop_unlisted(self, written: Sequence[Path]) -> None:
        """Delete those of the upload files `written` (or of the rows just removed) that no
        library row names: no file is kept without its row, nor deleted under one."""
        if not written:
            return
        listed = {entry.path for entry in self.library.snapshot.by_id.values()}
        for path in written:
            if str(path) not in listed:
                _delete_upload(path)

    def _forget_files(self, entries: Sequence[ImageEntry]) -> None:
        """Delete the stored uploads of removed images (files added by other means stay),
        but for one that another row still lists (`shitu index add --allow-duplicates`
        added it again, under another label)."""
        uploads = [
            Path(e.path) for e in entries if e.path and Path(e.path).parent == self.upload_dir
        ]
        self._drop_unlisted(uploads)


def _delete_upload(path: Path) -> None:
    """Delete an upload file the library no longer lists; one that cannot be deleted (open in
    another program on Windows, say) is left, with a warning: the edit is made, and its answer
    (or the error that undid it) must not become a 500 for a file left over."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not delete %s, which the library no longer lists: %s", path, exc)
