"""One inference thread that runs the images of concurrent requests in shared model calls.

The model is loaded once and used by this thread only (onnxruntime already spreads one call
over the CPU cores; several calls at once would only fight over them). Requests queue their
images; each round the thread takes what is waiting, up to `max_batch`, and runs every kind
of work in one call. Nobody waits for a batch to fill: an idle server answers at once, and a
busy one batches exactly as much as piled up while the previous call ran.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import groupby
from typing import Any

logger = logging.getLogger(__name__)

Handler = Callable[[list[Any]], Sequence[Any]]
BatchObserver = Callable[[str, int, float], None]  # kind, batch size, seconds


@dataclass
class _Job:
    kind: str
    item: Any
    future: Future


class MicroBatcher:
    """`submit(kind, item)` -> Future of `handlers[kind]([..., item, ...])`'s matching entry.

    A handler maps a list of items to one result per item, in order. If a batch fails, its
    items are retried one by one, so one bad item fails only its own request.
    """

    def __init__(
        self,
        handlers: dict[str, Handler],
        max_batch: int,
        observe: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.handlers = handlers
        self.max_batch = max_batch
        self._observe = observe
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # no job is queued behind the stop marker
        self._thread = threading.Thread(target=self._run, name="shitu-inference", daemon=True)
        self._thread.start()

    def submit(self, kind: str, item: Any) -> Future:
        if kind not in self.handlers:
            raise ValueError(f"unknown kind of work: {kind}")
        future: Future = Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the inference thread has stopped")
            self._queue.put(_Job(kind, item, future))
        return future

    @property
    def waiting(self) -> int:
        """Images queued and not yet taken into a batch."""
        return self._queue.qsize()

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._closing:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = [first], False
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            for kind, group in groupby(sorted(live, key=lambda j: j.kind), key=lambda j: j.kind):
                self._execute(kind, list(group))
            if stop:
                return

    def _execute(self, kind: str, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            results = list(self.handlers[kind]([job.item for job in jobs]))
            if len(results) != len(jobs):
                raise RuntimeError(f"{kind}: {len(results)} results for {len(jobs)} items")
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            logger.warning("batch of %d %s jobs failed (%s); retrying singly", len(jobs), kind, exc)
            for job in jobs:
                self._execute(kind, [job])
            return
        if self._observe is not None:
            try:
                self._observe(kind, len(jobs), time.perf_counter() - start)
            except Exception:  # metrics must never stop inference
                logger.exception("the batch observer failed")
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
