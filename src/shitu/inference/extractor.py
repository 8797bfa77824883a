"""Batched feature extraction from an exported model folder (no config file needed).

Decoding and resizing run in worker threads (OpenCV releases the GIL) a window ahead
of the batch being embedded, so preprocessing overlaps with inference.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from shitu.closable import Closable
from shitu.data.transforms.ops import UnreadableImageError, image_list
from shitu.errors import CheckpointError, ConfigError
from shitu.fileio import expanded_path, file_sha256, is_given_path, refuse_url
from shitu.image_files import path_list
from shitu.inference import default_model
from shitu.inference.backends import (
    Backend,
    OnnxBackend,
    OpenVinoBackend,
    TorchBackend,
    check_runtime_names,
    choose_backend,
    onnxruntime_available,
)
from shitu.inference.cache import full_export
from shitu.inference.choices import device_type
from shitu.inference.manifest import (
    INT8_FILE,
    MANIFEST,
    ONNX_FILE,
    TORCH_FILE,
    ExportError,
    check_fingerprint,
    read_manifest,
    warn_of_unknown_entries,
)
from shitu.inference.preprocess import Preprocessing
from shitu.progress import ImageProgress
from shitu.runtime import check_thread_count, usable_cores
from shitu.vectors import l2_normalize

logger = logging.getLogger(__name__)


@dataclass
class ExtractionResult:
    features: np.ndarray  # float32 [N, D], L2-normalised rows
    paths: list[str]  # the N files embedded, in input order
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) skipped


def _warn_of_threads_over_cores(num_threads: int) -> None:
    """Warn of more inference threads than the CPU cores this process may run on: the
    extra ones wait for a core and stall the others, so inference gets slower, not faster
    (a PaddleClas inference_general.yaml sets cpu_num_threads: 10, a 2-core VM has 2)."""
    cores = usable_cores()
    if cores and num_threads > cores:
        logger.warning(
            "%d inference threads asked for, on %d CPU cores: the extra threads wait for a "
            "core, which slows inference; give at most %d with --threads (a pipeline "
            "config's Global.cpu_num_threads), or none for the runtime's default",
            num_threads,
            cores,
            cores,
        )


def _precision_fingerprint(manifest: dict[str, Any], precision: str) -> str:
    """The fingerprint of an export's features at `precision`: the export's own for fp32;
    other precisions give other features, and int8's depend on the calibration too (the
    quantised file's hash)."""
    fingerprint = manifest["fingerprint"]
    if precision == "fp32":
        return fingerprint
    detail = manifest["files"][INT8_FILE] if precision == "int8" else ""
    return hashlib.sha256(f"{fingerprint}:{precision}:{detail}".encode()).hexdigest()


class FeatureExtractor(Closable[Backend]):
    """Image files or arrays -> L2-normalised embeddings, with an exported model's own
    preprocessing. Build with `FeatureExtractor.load(model_dir)`.

    Threads: one extractor may embed in several threads at once (onnxruntime and torch take
    concurrent calls, OpenVINO's take turns); each call already uses the cores.

    `close()` (or `with`) releases the runtime's session and model memory once the calls
    under way end; calls after it raise ValueError. Close only when no thread will call
    again: one that starts as close runs may get either.
    """

    _releases = "its runtime"

    def __init__(
        self,
        backend: Backend,
        preprocessing: Preprocessing,
        embedding_size: int,
        fingerprint: str,
        workers: int | None = None,
        score_thres: float | None = None,
    ) -> None:
        self._resource = backend
        self._preprocessing = preprocessing
        self.embedding_size = embedding_size
        self.fingerprint = fingerprint
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        # The export's calibrated recognition threshold (cosine similarity), if it has one.
        self.score_thres = score_thres
        # The fingerprint of each precision a library may be built in with this export, by
        # precision (`load` fills it): a library refused as another model's may be this
        # one's at another --precision, which its refusal then says.
        self.precision_fingerprints: dict[str, str] = {}

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        backend: str = "auto",
        num_threads: int | None = None,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        workers: int | None = None,
    ) -> FeatureExtractor:
        """Open an export. backend: 'auto' (onnxruntime if installed and the ONNX file is
        there or can be rebuilt from a compact export into the cache, else torch),
        'onnxruntime', 'openvino' (`pip install 'shitu[openvino]'`, CPU) or 'torch'. num_threads:
        inference threads (None: the runtime's default). precision: fp32; int8
        (onnxruntime or openvino, needs model.int8.onnx); fp16/bf16 (torch on a GPU).
        device: as Global.device names it: 'cpu', 'cuda' (or 'gpu', PaddleClas's name) or
        'auto' (a GPU where torch sees one). workers: decoding threads (each decodes and
        resizes whole images, so loading sets OpenCV's own thread count, process-wide, to 1).

        The fingerprint is the export's for fp32 on either backend; other precisions give
        different features, so they get their own fingerprint.
        """
        if workers is not None:  # None: a share of the cores
            check_count(workers, "workers")
            check_thread_count(workers, "workers")
        if num_threads is not None:  # None: the runtime's default
            check_count(num_threads, "num_threads")
            check_thread_count(num_threads, "num_threads")
            _warn_of_threads_over_cores(num_threads)
        check_runtime_names(backend, precision, device)
        device = device_type(device)  # the names Global.device takes
        if not is_given_path(model_dir):
            raise CheckpointError(
                f"model_dir: expected an exported model's folder "
                f"(shitu.inference.default_model_dir() is the shipped one), got {model_dir!r}"
            )
        refuse_url(model_dir, "models", CheckpointError)  # as a Path: `https:/host/model`
        model_dir = expanded_path(model_dir)
        manifest = read_manifest(model_dir)
        warn_of_unknown_entries(model_dir, manifest)  # its own, not a rebuilt cache entry's
        score_thres = _score_thres(model_dir, manifest)  # a rebuilt cache entry has none
        # The weights every path loads, converts or fingerprints: checked once, here.
        _verify(model_dir, manifest, TORCH_FILE)
        rebuilt = None
        if (
            _compact(model_dir, manifest)
            and backend != "torch"
            and precision == "fp32"
            and onnxruntime_available()
        ):
            try:
                rebuilt = full_export(model_dir, manifest)
            except ExportError as exc:
                if backend != "auto":  # the runtime asked for runs the ONNX model only
                    message = f"backend {backend}: {exc}, or use the torch backend"
                    raise ConfigError(message) from None
                logger.warning("%s; using the torch backend", exc)
            else:  # its files were hashed when it was checked or built
                model_dir, manifest = rebuilt, read_manifest(rebuilt)
        chosen = choose_backend(model_dir, backend, precision, device)
        if backend == "auto" and chosen == "torch" and precision == "fp32" and device == "cpu":
            _warn_of_a_lost_onnx_model(model_dir, manifest)
        if chosen in ("onnxruntime", "openvino"):
            path = model_dir / (INT8_FILE if precision == "int8" else ONNX_FILE)
            if rebuilt is None:
                _verify(model_dir, manifest, path.name)
            if chosen == "onnxruntime":
                runtime: Backend = OnnxBackend(path, num_threads, device)
            else:
                runtime = OpenVinoBackend(path, num_threads)
        else:
            runtime = TorchBackend(model_dir, manifest, num_threads, device, precision)
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
        takes = runtime.input_size
        if takes is not None and takes != preprocessing.size[::-1]:
            raise CheckpointError(
                f"{model_dir}: the model takes {takes[1]}x{takes[0]} images, but {MANIFEST} "
                f"preprocessing makes {preprocessing.size[0]}x{preprocessing.size[1]} "
                "(edited by hand? export the model again)"
            )
        if chosen != "torch" and rebuilt is None:
            # The torch backend checked it as it loaded the weights; the ONNX graph leaves
            # out preprocessing, so an edit there would change the features unseen.
            check_fingerprint(model_dir, manifest)
        _check_embedding_size(model_dir, runtime, preprocessing, manifest["embedding_size"])
        # Process-wide (OpenCV has no other setting): parallelism comes from the decoding
        # threads, so OpenCV's own would only compete with them; the docstring says so.
        cv2.setNumThreads(1)
        # A library's precisions (index build's): fp32, and int8 where the export has it
        library_precisions = (
            ("fp32", "int8") if INT8_FILE in manifest.get("files", {}) else ("fp32",)
        )
        extractor = cls(
            runtime,
            preprocessing,
            int(manifest["embedding_size"]),
            _precision_fingerprint(manifest, precision),
            workers,
            score_thres,
        )
        extractor.precision_fingerprints = {
            other: _precision_fingerprint(manifest, other) for other in library_precisions
        }
        return extractor

    def __repr__(self) -> str:
        if self._resource is None:
            return f"FeatureExtractor(closed, fingerprint='{self.fingerprint[:12]}...')"
        return (
            f"FeatureExtractor(backend={self._resource.name!r}, "
            f"embedding_size={self.embedding_size}, fingerprint='{self.fingerprint[:12]}...', "
            f"score_thres={self.score_thres})"
        )

    @property
    def backend(self) -> Backend:
        """The runtime that embeds; a ValueError once the extractor is closed."""
        return self._held()

    @property
    def preprocessing(self) -> dict:
        """What the export's JSON records (size, mean/std, interpolation, channel order)."""
        return self._preprocessing.to_dict()

    def check_size(self, width: int, height: int) -> None:
        """UnreadableImageError, naming the problem, for an image size this model's
        preprocessing cannot take (one too elongated to resize its short side, say): check
        before `extract_images`, where one such image fails the whole call."""
        self._preprocessing.check_size(width, height)

    def extract_images(self, images: Iterable[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """RGB uint8 HxWx3 arrays (e.g. detector crops) -> float32 [N, D], L2-normalised."""
        check_count(batch_size, "batch_size")
        runtime = self.backend  # a closed extractor is refused before any work
        images = image_list(images)
        chunks = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            prepared = [
                self._prepared(image, start + offset, len(images))
                for offset, image in enumerate(chunk)
            ]
            chunks.append(self._embed(runtime, prepared))
        return np.concatenate(chunks) if chunks else self._empty()

    def _prepared(self, image: np.ndarray, index: int, count: int) -> np.ndarray:
        """One image of `extract_images`'s `count` as the model takes it; refused, it is
        named by its place (`in_batch`)."""
        try:
            return self._preprocessing.normalize(self._preprocessing.prepare(image))
        except UnreadableImageError as exc:
            raise in_batch(exc, index, count) from None

    def extract_files(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 32,
        progress: bool | ImageProgress = False,
    ) -> ExtractionResult:
        """Embed image files in order; unreadable ones are skipped and listed in `failures`.
        `progress`: draw an `embedding` bar on stderr, or advance the one given (left open
        for the caller's next call)."""
        check_count(batch_size, "batch_size")
        runtime = self.backend  # a closed extractor is refused before any decoding
        names = path_list(paths)
        window = 2 * batch_size + self.workers  # decoded ahead: bounded memory
        features: list[np.ndarray] = []
        embedded: list[str] = []
        failures: list[tuple[str, str]] = []
        batch: list[np.ndarray] = []
        with (
            ThreadPoolExecutor(self.workers, thread_name_prefix="shitu-decode") as pool,
            (
                contextlib.nullcontext(progress)
                if isinstance(progress, ImageProgress)
                else ImageProgress(len(names), progress, "embedding")
            ) as bar,
        ):
            pending: deque[tuple[str, Future[np.ndarray]]] = deque()
            upcoming = iter(names)

            def fill() -> None:
                while len(pending) < window:
                    name = next(upcoming, None)
                    if name is None:
                        return
                    pending.append((name, pool.submit(self._preprocessing.load, name)))

            fill()
            while pending:
                name, future = pending.popleft()
                fill()
                try:
                    batch.append(future.result())
                    embedded.append(name)
                except (UnreadableImageError, cv2.error) as exc:
                    failures.append((name, str(exc).strip()))
                    bar.skip()
                if len(batch) == batch_size or (not pending and batch):
                    features.append(self._embed(runtime, batch))
                    bar.update(len(batch))
                    batch = []
        return ExtractionResult(
            np.concatenate(features) if features else self._empty(), embedded, failures
        )

    def _embed(self, runtime: Backend, images: list[np.ndarray]) -> np.ndarray:
        features = runtime(np.ascontiguousarray(np.stack(images)))
        if features.ndim != 2 or features.shape[1] != self.embedding_size:
            # A hand-edited manifest would otherwise put wrong-sized vectors in a library.
            raise CheckpointError(
                f"the model gives features of shape {list(features.shape)}, but its "
                f"{MANIFEST} says embedding_size {self.embedding_size}"
            )
        return l2_normalize(features)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.embedding_size), np.float32)


def in_batch(error: UnreadableImageError, index: int, count: int) -> UnreadableImageError:
    """`error` about image `index` of `count` given together, naming its place where there
    are several: the message alone ('got uint8 (348, 348)') did not say which was refused."""
    if count == 1:
        return error
    return UnreadableImageError(f"image {index} (from 0) of {count}: {error}")


def check_count(value: int, name: str) -> None:
    """A ConfigError naming `name` unless `value` is a whole number >= 1 (a batch size or a
    number of threads of 0 or less would embed nothing, or fail deep inside)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ConfigError(f"{name}: expected a whole number >= 1, got {value!r}")


def _check_embedding_size(
    model_dir: Path, runtime: Backend, preprocessing: Preprocessing, expected: int
) -> None:
    """A CheckpointError, naming the export, where the model's features are not of the size
    its manifest records, which the fingerprint does not cover: an edited size loaded, the
    extractor reporting it, and was refused only at the first image, naming no folder (as
    'this model gives 256-d' by a library of the model's own 512-d features)."""
    width, height = preprocessing.size
    features = runtime(np.zeros((1, 3, height, width), np.float32))
    if features.ndim != 2 or features.shape[1] != expected:
        raise CheckpointError(
            f"{model_dir}: the model gives features of shape {list(features.shape)}, but its "
            f"{MANIFEST} says embedding_size {expected} (edited by hand? export the model again)"
        )


def _score_thres(model_dir: Path, manifest: dict) -> float | None:
    value = manifest.get("score_thres")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1 <= value <= 1:
        raise CheckpointError(
            f"{model_dir / MANIFEST}: score_thres must be a cosine similarity in [-1, 1] "
            f"or null, got {value!r}"
        )
    return float(value)


def _compact(model_dir: Path, manifest: dict) -> bool:
    return manifest.get("weights_dtype") == "float16" and not (model_dir / ONNX_FILE).is_file()


def _warn_of_a_lost_onnx_model(model_dir: Path, manifest: dict) -> None:
    """Warn where the export recorded an ONNX model that is gone (deleted by hand or by a
    cleaner): 'auto' then runs the slower torch backend, which the user would otherwise
    learn only from the backend's name. Not an error, as the torch backend checks the
    weights it runs; an ONNX runtime asked for by name refuses the folder (`_verify`)."""
    path = model_dir / ONNX_FILE
    if ONNX_FILE in manifest["files"] and not path.is_file() and onnxruntime_available():
        logger.warning(
            "%s: missing from the export (its %s lists it), so the slower torch backend runs "
            "the model: re-run `shitu export` to restore it",
            path,
            MANIFEST,
        )


def _verify(model_dir: Path, manifest: dict, name: str) -> None:
    """The file must be the one the export wrote (a swapped or truncated file is an error)."""
    path = model_dir / name
    expected = manifest.get("files", {}).get(name)
    if not path.is_file() or expected is None:
        hint = " with --int8-calibration" if name == INT8_FILE else ""
        # A file there but not recorded was put there by hand (or by another export).
        problem = "not one the export recorded" if path.is_file() else "missing from the export"
        shipped = default_model.is_shipped_model(model_dir)
        remedy = SHIPPED_MODEL_DAMAGED if shipped else f"re-run `shitu export`{hint}"
        raise CheckpointError(f"{path}: {problem} ({remedy})")
    if file_sha256(path) != expected:
        shipped = default_model.is_shipped_model(model_dir)
        changed = f"changed? {SHIPPED_MODEL_DAMAGED}" if shipped else "changed?"
        raise CheckpointError(f"{path}: does not match {model_dir}/shitu_model.json ({changed})")


# The shipped model's files come with shitu, not from an export the user could run again.
SHIPPED_MODEL_DAMAGED = "the model shipped with shitu is damaged: reinstall shitu"
