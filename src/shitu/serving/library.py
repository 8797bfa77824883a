"""A gallery library shared by request threads: searches run concurrently, writes one at a time.

A `Gallery`'s SQLite connection belongs to the thread that opened it (other threads may
only search). So every call that touches SQLite runs on the library's own thread (`run`),
which also serialises the writes; searches touch only the in-memory index and run on the
caller's thread, also while a write runs or waits for another process's (the gallery swaps
in each generation whole). Listing reads a snapshot that is replaced after each write, so
browsing waits for no write.

Other processes may write the library too (`shitu index add ...`): at most once a second,
a search or a look at the snapshot has the library's thread check for a newer generation
(one SQLite read) and load it (a Faiss index whose file those writes kept takes only the
rows they changed), and waits for that before answering, so a request made a second or
more after their edit sees it, however long the server sat idle before (one within the
second after a check may answer from the generation that check found); a search or listing
made while an edit of this server's is under way does not wait (the check would queue
behind the edit, which may wait minutes for another process's rebuild): it answers from
the generation loaded. An edit loads them first, always: it checks what it changes against
the library as it is. A library deleted and built again at its path (`index build` renames
a whole one into place) is opened in place of the one served at the same check, if it
holds the same model's features.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np

from shitu.errors import GalleryError
from shitu.index import Gallery, SearchResult
from shitu.index.backends import Change
from shitu.index.labels import normal_form
from shitu.index.manifest import Manifest, ModelMismatchError
from shitu.index.metadata import ImageEntry, LibraryBusyError, LockWaitStopped
from shitu.serving.errors import ServiceUnavailable

T = TypeVar("T")
logger = logging.getLogger(__name__)
SYNC_INTERVAL_S = 1.0  # how often other processes' writes are looked for
RETRY_S = 30.0  # how long a generation that failed to load waits before another try


@dataclass(frozen=True)
class Snapshot:
    """The library's rows and facts as of one generation (read without locks, so never
    changed: a write makes a new one)."""

    by_id: dict[int, ImageEntry]  # ordered by id
    by_label: dict[str, tuple[ImageEntry, ...]]  # by label (normal form), each by id
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, gallery: Gallery) -> Snapshot:
        """Every row read: seconds in a library of 200k images."""
        entries = gallery.entries()  # ordered by id
        by_label: dict[str, list[ImageEntry]] = {}
        for entry in entries:
            by_label.setdefault(normal_form(entry.label), []).append(entry)
        return cls(
            by_id={entry.id: entry for entry in entries},
            by_label={label: tuple(by_label[label]) for label in sorted(by_label)},
            stats=gallery.stats(),
        )

    def edited(self, change: Change, added: list[ImageEntry], stats: dict[str, Any]) -> Snapshot:
        """This snapshot after `change`, a write made on top of its generation (`added`: the
        rows it added): only the labels that the change touched are listed again."""
        by_id = dict(self.by_id)
        removed = [by_id.pop(int(i)) for i in change.removed_ids]
        before = [by_id[int(i)] for i in change.relabelled_ids]
        renamed = [replace(entry, label=change.relabelled_to) for entry in before]
        by_id.update((entry.id, entry) for entry in [*renamed, *added])  # added: the last ids
        left = {entry.id for entry in [*removed, *before]}  # their listings lose these
        listings: dict[str, list[ImageEntry]] = {
            label: [entry for entry in self.by_label.get(label, ()) if entry.id not in left]
            for label in {normal_form(e.label) for e in [*removed, *before, *renamed, *added]}
        }
        for entry in [*renamed, *added]:
            listings[normal_form(entry.label)].append(entry)
        by_label = dict(self.by_label)
        for label, entries in listings.items():
            if entries:
                by_label[label] = tuple(sorted(entries, key=lambda entry: entry.id))
            else:
                del by_label[label]
        if by_label.keys() != self.by_label.keys():  # a label came or went: sorted again
            by_label = {label: by_label[label] for label in sorted(by_label)}
        return Snapshot(by_id, by_label, stats)


class SharedLibrary:
    """Wraps an open Gallery; also stands in for it where the Recognizer searches.

    Build with `SharedLibrary()`, open the gallery with `run(...)` so it belongs to the
    library's thread, then `attach` it.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="shitu-gallery")
        self._thread = self._executor.submit(threading.current_thread).result()
        self._edits_lock = threading.Lock()
        self._edits = 0  # edits queued for or running on the library's thread
        self._gallery: Gallery | None = None
        self._snapshot = Snapshot({}, {})
        self._sync_guard = threading.Lock()
        self._pending_sync: Future[None] | None = None
        self._last_sync = time.monotonic()
        # The generation that last failed to load, and when: retried after RETRY_S (the
        # cause may pass, say a file still being copied), its failure logged once.
        self._failed: tuple[int | None, float] | None = None
        # The library at its path replaced by one that cannot be opened: said once; and the
        # database file there that last failed to open, and when (retried after RETRY_S)
        self._replaced_logged = False
        self._replacement_failed: tuple[tuple[int, int, int] | None, float] | None = None
        # When an edit last gave up waiting for another process's write (library thread only)
        self._waited_out_at = -math.inf

    def run(self, fn: Callable[[], T]) -> T:
        """Call `fn` on the library's thread (inline if already there) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        return self._executor.submit(fn).result()

    def edit(self, fn: Callable[[], T]) -> T:
        """`run(fn)` once other processes' writes are loaded: an edit checks the ids and
        labels it changes against the library as it is, not as of the last sync (up to
        SYNC_INTERVAL_S old, where an image another process removed is still listed).
        Refused (ServiceUnavailable) before `fn` writes anything while the library at the
        path is gone: an add's upload file made the deleted library's folder again, which
        then stood in the way of the `index build --out LIB` that would replace it."""

        def job() -> T:
            self._sync()  # opens a library built again at the path in its place
            if self.gallery.replaced():
                raise ServiceUnavailable(
                    f"{self.gallery.root} was deleted or built again since the server opened "
                    "it, and no library there can be served (the server's log says why): "
                    "edits are refused until one is built there; nothing was changed"
                )
            return fn()

        return self._run_edit(job)

    def _run_edit(self, job: Callable[[], T]) -> T:
        """`run(job)`, counted among the edits under way (searches do not wait behind them).
        An edit queued while an earlier one waited for another process's lock, a wait that
        ended in vain, is refused at once: each would wait the same again, and the last of
        N edits sent together waited N times as long (N minutes)."""
        queued = time.monotonic()

        def unless_waited_out() -> T:
            if self._waited_out_at >= queued:
                raise LibraryBusyError(
                    f"{self.gallery.root}: another process keeps the library locked (a long "
                    "write, such as `shitu index rebuild`): the edit before this one waited "
                    "for it in vain while this one waited its turn; nothing was changed, "
                    "retry when it has finished"
                )
            try:
                return job()
            except LockWaitStopped:  # the server stops: later edits are stopped as well
                raise
            except LibraryBusyError:
                self._waited_out_at = time.monotonic()
                raise

        with self._edits_lock:
            self._edits += 1
        try:
            return self.run(unless_waited_out)
        finally:
            with self._edits_lock:
                self._edits -= 1

    def attach(self, gallery: Gallery) -> None:
        """Take over a gallery opened on this library's thread."""
        self._gallery = gallery
        self._snapshot = self.run(lambda: Snapshot.of(gallery))

    @property
    def gallery(self) -> Gallery:
        if self._gallery is None:
            raise RuntimeError("no gallery attached")
        return self._gallery

    @property
    def manifest(self) -> Manifest:
        return self.gallery.manifest

    @property
    def snapshot(self) -> Snapshot:
        """The rows and facts of the latest generation; no lock, but once a second it waits
        for the check for other processes' writes, unless an edit is under way: the check
        queues behind it, and the page's listings and thumbnails would wait out an edit
        that waits for another process's write (up to a minute). Call it from a worker
        thread, never from the event loop."""
        self._sync_if_due()
        return self._snapshot

    @property
    def last_loaded(self) -> Snapshot:
        """The snapshot as the last write or check left it, never waiting, for answers that
        must come while a long write runs (/healthz, /metrics); the check for other
        processes' writes is started where it is due, for the next answer to have them:
        without it, where no request read the library, /healthz and the /metrics gauges
        gave the counts from before another process's edit for good."""
        self._sync_if_due(wait=False)
        return self._snapshot

    def search(
        self, vectors: np.ndarray, k: int = 5, min_score: float | None = None
    ) -> SearchResult:
        self._sync_if_due()
        gallery = self.gallery
        try:
            return gallery.search(vectors, k, min_score)
        except GalleryError:
            replacement = self._gallery
            if replacement is None or replacement is gallery:
                raise
            # closed as it was replaced by a library built again at its path, after this
            # search took it and before it ran
            return replacement.search(vectors, k, min_score)

    def _sync_if_due(self, wait: bool = True) -> None:
        """If it is time, have the library's thread load other processes' writes, and wait
        for it (with every other request that finds the same check under way), but not
        where an edit is queued or running (the check runs after it), nor without `wait`."""
        if threading.current_thread() is self._thread:
            return  # a write job's own reads: it is the thread that would sync
        with self._sync_guard:
            pending = self._pending_sync
            if pending is None:
                due = time.monotonic() - self._last_sync >= SYNC_INTERVAL_S
                if not due or self._gallery is None:
                    return
                try:
                    pending = self._pending_sync = self._executor.submit(self._sync)
                except RuntimeError:  # closing: the thread takes no more work
                    return
        if wait and not self._edits:  # an edit queued later runs after the check
            pending.result()

    def _sync(self) -> None:
        gallery = self._gallery
        if gallery is None:
            with self._sync_guard:
                self._pending_sync = None
            return
        generation = None
        try:
            if gallery.replaced():
                gallery = self._switch_to_replacement(gallery)
            generation = gallery.generation_on_disk()
            failed = self._failed
            waiting = (
                failed is not None
                and failed[0] == generation
                and time.monotonic() - failed[1] < RETRY_S
            )
            if generation != gallery.manifest.generation and not waiting:
                gallery.refresh()
                self._snapshot = Snapshot.of(gallery)
                self._failed = None
                logger.info(
                    "%s: loaded generation %d, written by another process",
                    gallery.root,
                    gallery.manifest.generation,
                )
        except Exception as exc:  # e.g. re-embedded with another model: keep serving, say why
            if self._failed is None or self._failed[0] != generation:
                _log_not_loaded(gallery, generation, exc)
            self._failed = (generation, time.monotonic())
        finally:
            with self._sync_guard:
                self._pending_sync = None
                self._last_sync = time.monotonic()

    def _switch_to_replacement(self, gallery: Gallery) -> Gallery:
        """The library built at `gallery`'s path since it was opened (`rm -r LIB` and `index
        build --out LIB`, or a copy moved there), attached in its place, `gallery` closed
        once the searches under way finish; `gallery` itself while none can be opened there
        (deleted and not built yet, another model's, or unreadable): then it goes on
        answering, its edits refused. A database file there that failed to open is tried
        again after RETRY_S (opening may take a checksum of a large index), a new one at
        once."""
        on_disk = gallery.database_on_disk()
        failed = self._replacement_failed
        if failed is not None and failed[0] == on_disk and time.monotonic() - failed[1] < RETRY_S:
            return gallery
        try:
            replacement = gallery.open_replacement()
        except Exception as exc:
            self._replacement_failed = (on_disk, time.monotonic())
            if not self._replaced_logged:  # said once until one opens
                self._replaced_logged = True
                logger.error(
                    "%s was deleted or built again since the server opened it, and no library "
                    "there can be served (%s): the server goes on answering from the library "
                    "it opened, whose edits are refused, until one that can is built there",
                    gallery.root,
                    exc,
                )
            return gallery
        self._gallery = replacement
        self._snapshot = Snapshot.of(replacement)
        self._failed = None
        self._replaced_logged = False
        self._replacement_failed = None
        logger.warning(
            "%s was built again since the server opened it: now serving the library there "
            "(generation %d, %d images)",
            replacement.root,
            replacement.manifest.generation,
            len(replacement),
        )
        gallery.close()  # after the searches that hold it; later ones find the replacement
        return replacement

    def write(self, mutate: Callable[[Gallery], T]) -> T:
        """Run `mutate(gallery)` on the library's thread, then bring the snapshot up to date."""

        def job() -> T:
            before = self._snapshot
            try:
                result = mutate(self.gallery)
            except BaseException:  # a failed write may still have reloaded the gallery
                self._snapshot = Snapshot.of(self.gallery)
                raise
            self._snapshot = self._after_write(before)
            return result

        return self._run_edit(job)

    def _after_write(self, before: Snapshot) -> Snapshot:
        """The snapshot after a write that began at `before`: the same if it wrote nothing,
        `before` edited where the gallery's generation is its own write on top of it, else
        (it loaded other processes' writes first, or made several) read whole."""
        gallery = self.gallery
        generation, change = gallery.manifest.generation, gallery.last_change
        if generation == before.stats.get("generation"):
            return before
        if change is None or generation - 1 != before.stats.get("generation"):
            return Snapshot.of(gallery)
        return before.edited(change, gallery.entries_with_ids(change.added_ids), gallery.stats())

    def stop_waiting(self) -> None:
        """For a server told to stop: edits that another process's write keeps waiting give
        up now (a 503 to retry), as do later ones that would wait, so that their requests
        are answered within the server's grace period and it stops (they held the stop up
        for up to a minute, and were cut off with a plain-text 500). Any thread may call it."""
        if self._gallery is not None:
            self._gallery.stop_waiting()

    def close(self, release: Callable[[], None] | None = None) -> None:
        """Close the gallery on the library's thread (its SQLite connection belongs there),
        then stop that thread. `release`: what closes the gallery first attached, with what
        was opened alongside it (say `Recognizer.close`, which also releases the model); run
        even where no gallery was attached yet. A library opened in place of that one (built
        again at its path) is closed after it."""
        gallery, self._gallery = self._gallery, None  # a sync queued now finds none

        def close_all() -> None:
            try:
                if release is not None:
                    release()
            finally:
                if gallery is not None:
                    gallery.close()  # nothing where `release` closed it

        try:
            self.run(close_all)
        finally:
            self._executor.shutdown()


def _log_not_loaded(gallery: Gallery, generation: int | None, exc: Exception) -> None:
    """Say why another process's generation of the library is not served (from its except
    block). A re-embedding with another model is no failure to retry: the server's own
    model cannot search it, so the advice is a restart with that model (the error's own,
    to re-embed, is what was just done)."""
    if isinstance(exc, ModelMismatchError):
        logger.error(
            "%s: generation %s, written by another process, holds the features of another "
            "model (%s); still serving generation %d: restart the server with that model "
            "(--model) to serve it",
            gallery.root,
            generation,
            exc.library_fingerprint,
            gallery.manifest.generation,
        )
        return
    logger.exception(
        "%s: could not load generation %s written by another process; still serving "
        "generation %d (retrying every %g s)",
        gallery.root,
        generation,
        gallery.manifest.generation,
        RETRY_S,
    )
