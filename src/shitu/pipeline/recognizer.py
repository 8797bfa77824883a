"""Detect, crop, embed, search: what is in a photo, by nearest labelled gallery image.

Per image the candidates are the detector's mainbody boxes plus the whole image. All
crops of a batch of images are embedded in one model call and searched at once. A box
keeps its best hit's label if the score passes `score_thres`; recognised boxes then go
through non-maximum suppression by recognition score.

Differences from PaddleClas's pipeline, each fixing something its users hit:
- The whole image is a fallback, used only when no detected box is recognised, so it
  never suppresses good object boxes (in PaddleClas it joins the NMS and, scoring high
  on a photo of several products, can remove a detected product that covers much of it).
- Scores are cosine similarities for inner-product and L2 libraries alike (a unit-vector
  L2 distance d is turned into 1 - d^2/2), so one `score_thres` means the same on both.
- Labels are whatever the library stores, spaces included; results are sorted by score.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from shitu.data.transforms.ops import UnreadableImageError, check_rgb_image, image_list
from shitu.detection.boxes import nms
from shitu.detection.detector import detectors_held, is_paddle_inference_model
from shitu.errors import CheckpointError, ConfigError, ShituError
from shitu.fileio import refuse_url, special_kind
from shitu.image_files import path_list
from shitu.index import Gallery
from shitu.index.gallery import NOT_FINITE
from shitu.inference.extractor import FeatureExtractor, check_count, in_batch
from shitu.inference.manifest import EXPORT_FILES, MANIFEST
from shitu.inference.preprocess import read_rgb
from shitu.pipeline.background import PlainBackgroundDetector
from shitu.pipeline.config import PipelineConfig, load_pipeline_config, with_settings
from shitu.pipeline.defaults import (
    DEFAULT_PIPELINE_CONFIG,
    DEFAULT_SCORE_THRES,
    NO_DETECTOR,
    PLAIN_BACKGROUND,
    SETTINGS,
)
from shitu.progress import ImageProgress
from shitu.values import is_number
from shitu.vectors import finite_rows

logger = logging.getLogger(__name__)

MIN_BOX_SIDE = 2  # pixels; thinner detector boxes cannot be embedded meaningfully
FILES_PER_BATCH = 8  # images decoded and recognised together by recognize_files
PathError = TypeVar("PathError", bound=ShituError)  # see _setting_error


class MainbodyDetector(Protocol):
    """What the pipeline needs from a detector (shitu.detection.Detector fits)."""

    def detect(
        self, image: np.ndarray, score_threshold: float = 0.3, max_boxes: int = 5
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class Recognition:
    """One recognised object: its box in image pixels, label, cosine score, gallery image id."""

    bbox: tuple[int, int, int, int]
    label: str
    score: float
    image_id: int

    def to_dict(self) -> dict[str, Any]:
        """The result as `shitu recognize` and the HTTP service write it: plain Python
        types for `json.dumps`, the score rounded to 5 decimals."""
        return {
            "bbox": list(self.bbox),
            "label": self.label,
            "score": round(self.score, 5),
            "image_id": self.image_id,
        }


@dataclass(frozen=True)
class Candidates:
    """One image's candidate boxes with their best gallery hits, before the score
    threshold: the detector's boxes, and the whole image (the fallback). None: no hit."""

    boxes: list[Recognition | None]
    whole: Recognition | None


@dataclass(frozen=True)
class FileRecognition:
    """Results for one file; `error` says why it was skipped (then `results` is empty).
    `image`: the decoded RGB photo where `recognize_files(..., keep_images=True)` asked for
    it (to draw on without decoding the file again), else None."""

    path: str
    results: list[Recognition]
    error: str | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """`shitu recognize`'s JSON line for the file, `{"image", "results"}`, plus `"error"`
        for one that was skipped."""
        record: dict[str, Any] = {
            "image": self.path,
            "results": [r.to_dict() for r in self.results],
        }
        if self.error is not None:
            record["error"] = self.error
        return record


def checked_score_thres(value: float) -> float:
    """`value` if it is a cosine similarity threshold (-1 to 1), else a ConfigError: one
    above 1 would silently recognise nothing, one below -1 everything."""
    if not is_number(value) or not -1.0 <= value <= 1.0:  # NaN fails too
        raise ConfigError(f"score_thres: expected a cosine similarity from -1 to 1, got {value!r}")
    return value


def _check_pipeline_keywords(
    rec_nms_thres: float, det_threshold: float, max_det_results: int
) -> None:
    """A ConfigError naming the keyword for values the pipeline config would refuse under
    the same keys: an NMS threshold below 0 keeps only the best result and one above 1 is
    no NMS, and the detector's would fail only on the first image, or never without one."""
    for name, value in (("rec_nms_thres", rec_nms_thres), ("det_threshold", det_threshold)):
        if not is_number(value) or not 0.0 <= value <= 1.0:  # NaN fails too
            raise ConfigError(f"{name}: expected a number from 0 to 1, got {value!r}")
    whole = isinstance(max_det_results, Integral) and not isinstance(max_det_results, bool)
    if not whole or max_det_results < 0:
        raise ConfigError(f"max_det_results: expected a whole number >= 0, got {max_det_results!r}")


def _check_parts(extractor: object, gallery: object, detector: object) -> None:
    """A ConfigError for a part given as a path, which `Recognizer.open` takes, a gallery
    that is not an open library (the parts swapped, as `open` takes the gallery first), or
    an extractor or detector that is none (None, a detector's class): here
    it would fail with an AttributeError that says nothing of what to pass instead (the
    detector's only on the first photo)."""
    for name, value, how in (
        ("extractor", extractor, "FeatureExtractor.load(model_dir)"),
        ("gallery", gallery, "Gallery.open(path)"),
        ("detector", detector, "shitu.detection.load_detector(path), PlainBackgroundDetector()"),
    ):
        if isinstance(value, str | os.PathLike):
            raise ConfigError(
                f"{name}: expected a loaded part ({how}), got the path {os.fspath(value)!r}; "
                "Recognizer.open(gallery, model=...) takes paths"
            )
    if not isinstance(gallery, Gallery):
        swapped = isinstance(extractor, Gallery)
        order = "; the extractor comes first: Recognizer(extractor, gallery)" if swapped else ""
        raise ConfigError(
            f"gallery: expected an open library (Gallery.open(path)), got "
            f"{type(gallery).__name__}{order}"
        )
    if not hasattr(extractor, "extract_images"):  # None: else an AttributeError
        raise ConfigError(
            "extractor: expected a loaded model (FeatureExtractor.load(model_dir)), got "
            f"{type(extractor).__name__}"
        )
    if detector is not None and not callable(getattr(detector, "detect", None)):
        raise ConfigError(  # else an AttributeError on the first photo
            f"detector: expected one with a detect(image, ...) method (load_detector(path), "
            f"PlainBackgroundDetector()), got {type(detector).__name__}"
        )
    if isinstance(detector, type):  # its detect() would take the photo for `self`
        raise ConfigError(f"detector: expected an instance, {detector.__name__}(), not the class")


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A float box widened to whole pixels and clipped to the image."""
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return x1, y1, x2, y2


def build_detector(config: PipelineConfig) -> MainbodyDetector | None:
    """The config's detector: None (whole image), the plain-background one, or a model file."""
    name = config.detector
    if name is None or name == PLAIN_BACKGROUND:
        if config.Global.det_arch is not None:  # dropped unnoticed, whole images would puzzle
            logger.warning(
                "Global.det_arch (--det-arch) %r is not used: %s",
                config.Global.det_arch,
                "no detector is given" if name is None else f"{PLAIN_BACKGROUND} has no model",
            )
        _warn_of_unused_detector_settings(config)
        return None if name is None else PlainBackgroundDetector()
    try:  # a URL was "no such file", not said to be one
        refuse_url(name, "detectors", ConfigError)
    except ConfigError as exc:
        raise _setting_error(ConfigError, "detector", str(exc)) from None
    path = Path(name)
    detectors = (
        f"a detector file (.onnx, .pt or .pdparams), '{NO_DETECTOR}' or '{PLAIN_BACKGROUND}'"
    )
    export = path if path.is_dir() else path.parent if path.name in EXPORT_FILES else None
    if export is not None and (export / MANIFEST).is_file():  # --detector for --model
        part = "" if export == path else "a file of "
        raise _setting_error(
            ConfigError,
            "detector",
            f"{name} is {part}an exported recognition model, not a detector: that goes to "
            f"--model ({export}); give as --detector {detectors}",
        )
    if not path.is_file():  # PaddleClas configs name a Paddle inference folder here
        problem = (
            f"{name} is a folder, not a file"
            if path.is_dir()
            else f"{name} is {special_kind(path.stat())}, not a detector file"
            if path.exists()  # a device, a FIFO: was "no such file"
            else f"{name}: no such file"
        )
        way_out = f"give {detectors}{detectors_held(path)}"  # '' but for a folder
        if is_paddle_inference_model(path):  # PaddleDetection's export: model.pdiparams
            problem = f"{name} is a Paddle inference model, which shitu does not run"
            way_out = (
                "give the PicoDet weights it was made from (.pdparams, with --det-arch) or "
                "an ONNX export"
            )
        raise _setting_error(ConfigError, "detector", f"{problem}; {way_out}")
    from shitu.detection import load_detector

    g = config.Global
    size = config.DetPreProcess.input_size if config.DetPreProcess else None
    try:
        return load_detector(name, g.det_backend, g.det_arch, size, g.cpu_num_threads)
    except CheckpointError as exc:  # an unreadable file: named by its key, as a missing one
        raise _setting_error(CheckpointError, "detector", str(exc)) from None


def _setting_error(kind: type[PathError], flag: str, problem: str) -> PathError:
    """A `kind` error about the path that the setting of `flag` (a SETTINGS name) gives:
    `KEY (--FLAG): PROBLEM`, with KEY and PROBLEM kept (`setting`, `problem`) for a caller
    that names where else the path came from (`shitu recognize`: the config file)."""
    key = ".".join(SETTINGS[flag])
    error = kind(f"{key} (--{flag}): {problem}")
    error.setting, error.problem = key, problem
    return error


def _warn_of_unused_detector_settings(config: PipelineConfig) -> None:
    """Name the detector settings set away from their defaults that no detector reads: `-o
    Global.threshold=0.5` without --detector changed nothing, without a word. Without a
    detector neither applies; plain-background boxes every region it finds at score 1."""
    g = config.Global
    unused = {"threshold": g.threshold}
    why = f"{PLAIN_BACKGROUND} scores every region it finds 1"
    if config.detector is None:
        unused["max_det_results"] = g.max_det_results
        why = "no detector is given (--detector)"
    for key, value in unused.items():
        if value != type(g).model_fields[key].default:
            logger.warning("Global.%s %s is not used: %s", key, value, why)


def load_extractor(config: PipelineConfig) -> FeatureExtractor:
    """The config's recognition model (the shipped one unless Global.rec_inference_model_dir)
    on its runtime; one that cannot be loaded is a CheckpointError naming the key."""
    from shitu.inference import default_model_dir

    g = config.Global
    try:  # the setting as given: Path() reads a URL as the missing `https:/host/model`
        return FeatureExtractor.load(
            g.rec_inference_model_dir or default_model_dir(),
            g.rec_backend,
            g.cpu_num_threads,
            precision=g.rec_precision,
        )
    except CheckpointError as exc:
        if g.rec_inference_model_dir is None:
            raise
        # The way back to the shipped model, unless the error gives it already (a library
        # given as the model: "or none for the shipped model"), which said it twice.
        shipped = (
            ""
            if exc.names_shipped_model
            else " (set it to null, or give no --model, for the model shipped with shitu)"
        )
        raise _setting_error(CheckpointError, "model", f"{exc}{shipped}") from None


class Recognizer:
    """Recognise the objects in images against a gallery library.

    Build from parts, with `Recognizer.open(gallery, ...)` or with
    `Recognizer.from_config(config)`; `close()` (or `with`) closes the library, model and
    detector `open` or `from_config` opened (parts passed in stay their caller's).
    Scores are cosine similarities; images are RGB (OpenCV's BGR arrays need
    `image[:, :, ::-1]` first).

    Threads: `recognize`, `recognize_batch`, `score_batch` and `recognize_files` may run in
    several threads at once, with the same results as one at a time (the feature and
    detector runtimes, and `Gallery.search`, take concurrent calls); each call already
    spreads its model work over the cores, so more threads add little speed. `close()`
    belongs to the thread that opened the library (see `Gallery`), once no other thread
    will call.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        gallery: Gallery,
        detector: MainbodyDetector | None = None,
        *,
        score_thres: float | None = None,
        rec_nms_thres: float = 0.05,
        det_threshold: float = 0.2,
        max_det_results: int = 5,
        batch_size: int = 32,
    ) -> None:
        _check_parts(extractor, gallery, detector)
        gallery.check_embedder(extractor)
        if gallery.manifest.metric == "l2" and not gallery.manifest.normalize:
            raise ConfigError(
                f"{gallery.root}: an L2 library without normalisation scores by distance, "
                "not cosine similarity, so no score_thres means anything on it; build the "
                "library with normalize (the default) to recognise with it"
            )
        check_count(batch_size, "batch_size")
        _check_pipeline_keywords(rec_nms_thres, det_threshold, max_det_results)
        self.extractor = extractor
        self.gallery = gallery
        self.detector = detector
        # None: the threshold calibrated for the model (its export's), else the default.
        self.score_thres: float = checked_score_thres(
            next(
                v
                for v in (score_thres, extractor.score_thres, DEFAULT_SCORE_THRES)
                if v is not None
            )
        )
        self.rec_nms_thres = rec_nms_thres
        self.det_threshold = det_threshold
        self.max_det_results = max_det_results
        self.batch_size = batch_size
        # What from_config opened, closed with the recogniser (parts passed in are not).
        self._opened = ExitStack()
        self._opened_gallery: Gallery | None = None  # the library among them
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: PipelineConfig | str | Path,
        *,
        extractor: FeatureExtractor | None = None,
        detector: MainbodyDetector | None = None,
    ) -> Recognizer:
        """Load the config's model (the shipped one unless `Global.rec_inference_model_dir`),
        detector and library (`IndexProcess.index_dir`, refused unless built with that
        model); `close()` closes them all. `config`: a `load_pipeline_config(...)`, or
        the YAML file (or shipped name) it would load without overrides. `extractor` and
        `detector`: the config's model and detector already loaded (`load_extractor(config)`,
        `build_detector(config)`; None: loaded here), by a caller that uses them before, to
        save loading them twice; they stay the caller's to close."""
        from shitu.inference import default_model_fingerprint

        if isinstance(config, str | Path):
            config = load_pipeline_config(config)
        elif not isinstance(config, PipelineConfig):
            raise ConfigError(
                f"expected a PipelineConfig (load_pipeline_config(name_or_path, overrides)) "
                f"or a config file's path, got {type(config).__name__}"
            )
        g = config.Global
        if not config.IndexProcess.index_dir:
            raise ConfigError(
                "IndexProcess.index_dir: no gallery library given: pass --gallery LIB (in "
                "Python, Recognizer.open(LIB), or index_dir in the config), a library that "
                "`shitu index build IMAGES --out LIB` makes from labelled images"
            )
        with ExitStack() as opened:  # each closed again if a later step fails
            if detector is None:
                detector = build_detector(config)
                if isinstance(detector, AbstractContextManager):  # one that holds a session
                    opened.enter_context(detector)
            if extractor is None:
                extractor = opened.enter_context(load_extractor(config))
            gallery = opened.enter_context(
                Gallery.open_for(
                    config.IndexProcess.index_dir,
                    extractor,
                    shipped_model=g.rec_inference_model_dir is None,
                    shipped_fingerprint=default_model_fingerprint(),
                )
            )
            recognizer = cls(
                extractor,
                gallery,
                detector,
                score_thres=config.IndexProcess.score_thres,
                rec_nms_thres=g.rec_nms_thresold,
                det_threshold=g.threshold,
                max_det_results=g.max_det_results,
                batch_size=g.batch_size,
            )
            recognizer._opened = opened.pop_all()
            recognizer._opened_gallery = gallery
        return recognizer

    @classmethod
    def open(
        cls,
        gallery: str | Path | None = None,
        *,
        model: str | Path | None = None,
        detector: str | Path | None = None,
        det_arch: str | None = None,
        score_thres: float | None = None,
        threads: int | None = None,
        runtime: str | None = None,
        precision: str | None = None,
        config: PipelineConfig | str | Path = DEFAULT_PIPELINE_CONFIG,
    ) -> Recognizer:
        """The recogniser `shitu recognize --gallery GALLERY` runs, its flags as keywords
        (None: the config's value, as a flag left out; `gallery` too, the config's
        IndexProcess.index_dir, as --gallery may be): `model` an export folder (default:
        the shipped model), `detector` a detector file, "plain-background" or "none" (the
        default: whole images), `config` a pipeline YAML file or shipped name, or a
        `load_pipeline_config(...)` (with overrides; the keywords go on a copy of it, so
        that the caller's config is left as it was)."""
        for name, value in (("gallery", gallery), ("model", model), ("detector", detector)):
            # An open Gallery or loaded model, which the config would call 'not a string'
            if value is not None and not isinstance(value, str | os.PathLike):
                raise ConfigError(
                    f"{name}: Recognizer.open takes paths, got {type(value).__name__}; loaded "
                    "parts go to Recognizer(extractor, gallery, detector)"
                )
        # Refused as the constructor and FeatureExtractor.load refuse them: the config
        # would take the text "0.5" or "2" for its number.
        if score_thres is not None:
            checked_score_thres(score_thres)
        if threads is not None:
            check_count(threads, "threads")
        if isinstance(config, PipelineConfig):
            base = config.model_copy(deep=True)
        else:
            base = load_pipeline_config(config)
        settings = {
            "gallery": gallery,
            "model": model,
            "detector": detector,
            "det_arch": det_arch,
            "score_thres": score_thres,
            "threads": threads,
            "runtime": runtime,
            "precision": precision,
        }
        return cls.from_config(with_settings(base, settings))

    def __repr__(self) -> str:
        return (
            f"Recognizer(extractor={self.extractor!r}, gallery={self.gallery!r}, "
            f"detector={self.detector!r}, score_thres={self.score_thres})"
        )

    def close(self) -> None:
        """Close the library, model and detector `from_config` opened (parts passed in are
        left open); later recognitions are refused. From another thread than the one that
        opened the library it is refused before anything is closed: once the model was
        closed and the library refused, a close on the right thread left the library open."""
        if self._opened_gallery is not None:
            self._opened_gallery.check_thread()
        self._closed = True
        self._opened.close()

    def _check_open(self) -> None:
        """A ValueError naming the recogniser once closed: its own parts would fail on
        their own terms ('the FeatureExtractor is closed'), or, passed in and still open,
        go on working, so that a use after close went unnoticed."""
        if self._closed:
            raise ValueError("the Recognizer is closed (by close() or the end of its `with` block)")

    def __enter__(self) -> Recognizer:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recognize(self, image: np.ndarray) -> list[Recognition]:
        """Objects in one RGB uint8 HxWx3 image, best score first."""
        return self.recognize_batch([image])[0]

    def recognize_batch(self, images: Iterable[np.ndarray]) -> list[list[Recognition]]:
        """Objects per image; every crop of every image is embedded in one batch."""
        return [self.select(candidates) for candidates in self.score_batch(images)]

    def score_batch(self, images: Iterable[np.ndarray]) -> list[Candidates]:
        """Every candidate box of every image with its best gallery hit, before the
        threshold: `select` turns them into results, at any threshold, without re-embedding."""
        self._check_open()
        crops: list[np.ndarray] = []
        boxes_per_image: list[list[tuple[int, int, int, int]]] = []  # whole image last
        images = image_list(images)
        for index, image in enumerate(images):
            try:
                check_rgb_image(image)
            except UnreadableImageError as exc:
                raise in_batch(exc, index, len(images)) from None
            boxes = self.candidate_boxes(image)
            boxes_per_image.append(boxes)
            crops.extend(image[y1:y2, x1:x2] for x1, y1, x2, y2 in boxes)
        if not crops:
            return []
        features = self.extractor.extract_images(crops, self.batch_size)
        # A crop the model gives NaN or inf is left unrecognised, said once per batch: the
        # search refused the whole batch for it, naming a row of the crops
        usable = finite_rows(features)
        if not usable.all():
            logger.warning(
                "%d of %d crops left unrecognised: %s",
                int((~usable).sum()),
                len(crops),
                NOT_FINITE,
            )
        hits = self.gallery.search(features[usable], k=1)
        hit_row = np.cumsum(usable) - 1  # each crop's row among the searched ones
        labels, scores, ids = hits.labels[:, 0], hits.scores[:, 0], hits.ids[:, 0]
        scored = [
            Recognition(box, str(labels[hit]), float(scores[hit]), int(ids[hit]))
            if usable[row] and ids[hit] >= 0  # an empty library has no hit
            else None
            for row, (hit, box) in enumerate(
                zip(hit_row, (box for boxes in boxes_per_image for box in boxes), strict=True)
            )
        ]
        candidates, start = [], 0
        for boxes in boxes_per_image:
            whole = start + len(boxes) - 1
            candidates.append(Candidates(scored[start:whole], scored[whole]))
            start += len(boxes)
        return candidates

    def select(self, candidates: Candidates, score_thres: float | None = None) -> list[Recognition]:
        """The results: detected boxes whose hit passes the threshold (default: this
        recogniser's), else the whole image if it passes; then NMS, best first."""
        threshold = self.score_thres if score_thres is None else checked_score_thres(score_thres)
        objects = [r for r in candidates.boxes if r is not None and r.score >= threshold]
        whole = candidates.whole
        found = objects or ([whole] if whole is not None and whole.score >= threshold else [])
        return self._nms(found)

    def candidate_boxes(self, image: np.ndarray) -> list[tuple[int, int, int, int]]:
        """The detector's usable boxes in whole pixels, then the whole image."""
        height, width = image.shape[:2]
        boxes = []
        if self.detector is not None:
            dets = self.detector.detect(image, self.det_threshold, self.max_det_results)
            for det in dets:
                x1, y1, x2, y2 = pixel_box(det[2:6], width, height)
                if self._usable_box(x2 - x1, y2 - y1):
                    boxes.append((x1, y1, x2, y2))
        boxes.append((0, 0, width, height))
        return boxes

    def _usable_box(self, width: int, height: int) -> bool:
        """Whether a detected box can be embedded: a sliver thinner than MIN_BOX_SIDE, or too
        elongated for the model's preprocessing to resize, holds no object to recognise, and
        embedding it would fail the whole photo."""
        if width < MIN_BOX_SIDE or height < MIN_BOX_SIDE:
            return False
        try:
            self.extractor.check_size(width, height)
        except UnreadableImageError:
            return False
        return True

    def _nms(self, found: list[Recognition]) -> list[Recognition]:
        """Greedy NMS by recognition score, whatever the labels (as PP-ShiTu); best first."""
        if not found:
            return []
        boxes = np.array([r.bbox for r in found], dtype=np.float64)
        scores = np.array([r.score for r in found], dtype=np.float64)
        keep = nms(boxes, scores, np.zeros(len(found), np.int64), self.rec_nms_thres)
        return [found[i] for i in keep.tolist()]

    def recognize_files(
        self, paths: Sequence[str | Path], progress: bool = False, keep_images: bool = False
    ) -> Iterator[FileRecognition]:
        """Results per file in input order; unreadable files come back with an error.
        keep_images: each result also holds its decoded photo (memory: one photo per result
        kept)."""
        for path, decoded, candidates in self._score_decoded(paths, progress):
            if isinstance(decoded, str):
                yield FileRecognition(path, [], decoded)
            else:
                assert candidates is not None  # _score_decoded scores each decoded image
                image = decoded if keep_images else None
                yield FileRecognition(path, self.select(candidates), image=image)

    def score_files(
        self, paths: Sequence[str | Path], progress: bool = False
    ) -> Iterator[tuple[str, Candidates | None, str | None]]:
        """(path, candidates, None) per file in input order, (path, None, reason) for an
        unreadable one: `score_batch` for files, decoded in threads."""
        for path, decoded, candidates in self._score_decoded(paths, progress):
            if isinstance(decoded, str):
                yield path, None, decoded
            else:
                assert candidates is not None  # _score_decoded scores each decoded image
                yield path, candidates, None

    def _score_decoded(
        self, paths: Sequence[str | Path], progress: bool
    ) -> Iterator[tuple[str, np.ndarray | str, Candidates | None]]:
        """(path, decoded image, candidates) per file in input order, (path, reason, None)
        for an unreadable one. `progress`: a `recognizing` bar, named as the bars of other
        work (`hashing` before it in `shitu eval-pipeline`), counting unreadable files."""
        names = path_list(paths)
        with (
            ThreadPoolExecutor(self.extractor.workers, thread_name_prefix="shitu-read") as pool,
            ImageProgress(len(names), progress, "recognizing") as bar,
        ):
            for start in range(0, len(names), FILES_PER_BATCH):
                chunk = names[start : start + FILES_PER_BATCH]
                decoded = list(pool.map(self._read_or_reason, chunk))
                readable = [image for image in decoded if isinstance(image, np.ndarray)]
                scored = iter(self.score_batch(readable))
                for name, image in zip(chunk, decoded, strict=True):
                    if isinstance(image, str):
                        yield name, image, None
                        bar.skip()
                    else:
                        yield name, image, next(scored)
                        bar.update(1)

    def _read_or_reason(self, path: str) -> np.ndarray | str:
        """The decoded file, or why it cannot be used: unreadable, or a size the model cannot
        take (too elongated to resize, say), which would fail the batch it joined."""
        try:
            image = read_rgb(path)
            self.extractor.check_size(image.shape[1], image.shape[0])
        except UnreadableImageError as exc:
            return str(exc)
        return image
