"""Detectors: an image in, boxes `[cls, score, x1, y1, x2, y2]` in its own pixels out.

Two backends share preprocessing (plain resize to the network input, ImageNet
normalisation) and post-processing (our decode + NMS, in numpy): our PyTorch PicoDet, and
onnxruntime running either a PaddleDetection export (per-level scores and box
distributions, batch 1) or our own export (decoded boxes and scores). Only the torch
backend imports torch.
"""

from __future__ import annotations

import json
import logging
import shlex
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from shitu.closable import Closable, Resource
from shitu.data.transforms.ops import UnreadableImageError, check_rgb_image, image_list
from shitu.detection.boxes import cell_centres, decode_distributions, level_shapes, multiclass_nms
from shitu.detection.input_size import check_input_size
from shitu.errors import CheckpointError, ConfigError
from shitu.fileio import refuse_non_utf8_path, refuse_url, special_kind
from shitu.inference.extractor import in_batch
from shitu.inference.manifest import PADDLE_INFERENCE_SUFFIXES
from shitu.onnx_input import image_input_size
from shitu.runtime import check_thread_count
from shitu.values import is_number

if TYPE_CHECKING:
    from onnxruntime import InferenceSession, NodeArg

    from shitu.detection.model import PicoDet, PicoDetArch

logger = logging.getLogger(__name__)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PIXEL_MAX = np.float32(255.0)
NMS_IOU = 0.6
NMS_TOP_K = 1000
CLASS_NAMES_KEY = "shitu.class_names"  # our ONNX export's metadata: its classes, a JSON list
# How PaddleDetection exports the per-level PicoDet layout shitu reads (no NMS in the
# graph), as every refusal of another layout names it.
_PER_LEVEL_PICODET_EXPORT = (
    "PaddleDetection's export without post-processing, -o export.benchmark=True"
)


def exported_class_names(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """The class names our ONNX export records in its metadata; () for other exports."""
    names = metadata.get(CLASS_NAMES_KEY)
    return tuple(json.loads(names)) if names else ()


def preprocess(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 3xHxW at `size` (h, w), ImageNet-normalised.

    PaddleDetection's PicoDet and PP-ShiTu's mainbody detector resize with OpenCV's bicubic
    filter (`interp: 2`), aspect ratio not kept: their weights expect exactly that input.
    """
    check_rgb_image(image)
    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    # Channel by channel, in place, into the CHW array the model takes: the float32 steps of
    # (pixels / 255 - MEAN) / STD, bit for bit, in a third to a half of the time of whole-image
    # temporaries and a transposed copy.
    out = np.empty((3, *resized.shape[:2]), np.float32)
    for index, channel in enumerate(out):
        channel[...] = resized[:, :, index]
        channel /= PIXEL_MAX
        channel -= MEAN[index]
        channel /= STD[index]
    return out


class Detector(Closable[Resource], ABC):
    """Common front end; backends only turn a batch into (scores [B,N,C], boxes [B,N,4]).
    Every backend has close() (and `with`), releasing its model or session: `load_detector`
    picks one by the file, and only an ONNX detector's took a `with` block."""

    input_size: tuple[int, int]
    class_names: tuple[str, ...] = ()
    num_classes: int | None = None  # the score width, where the model tells it

    def __repr__(self) -> str:
        if self._resource is None:
            return f"{type(self).__name__}(closed)"
        height, width = self.input_size
        return f"{type(self).__name__}(input_size={width}x{height}, classes={self.num_classes})"

    @abstractmethod
    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised batch [B, 3, H, W] -> scores [B, N, C], boxes [B, N, 4] in input pixels."""

    def detect(
        self,
        image: np.ndarray,
        score_threshold: float = 0.3,
        max_boxes: int = 5,
        class_agnostic: bool = True,
    ) -> np.ndarray:
        """Boxes [M, 6] float32 (cls, score, x1, y1, x2, y2), best first, in the pixels of
        `image`, an RGB uint8 HxWx3 array (OpenCV's BGR: `image[:, :, ::-1]` first)."""
        return self.detect_batch([image], score_threshold, max_boxes, class_agnostic)[0]

    def detect_batch(
        self,
        images: Iterable[np.ndarray],
        score_threshold: float = 0.3,
        max_boxes: int = 5,
        class_agnostic: bool = True,
    ) -> list[np.ndarray]:
        """`detect` for several images in one model call (an ONNX export of batch 1 runs
        them one by one)."""
        _check_detect_arguments(score_threshold, max_boxes)
        # One array alone was read a row an image (numpy's "truth value ... is ambiguous"),
        # and a generator, spent by the stacking, lost its images to the pairing below.
        images = image_list(images)
        if not len(images):
            return []
        batch = np.stack([self._prepared(img, i, len(images)) for i, img in enumerate(images)])
        scores, boxes = self.predict(batch)
        return [
            detections_in_image(
                s, b, img.shape[:2], self.input_size, score_threshold, max_boxes, class_agnostic
            )
            for img, s, b in zip(images, scores, boxes, strict=True)
        ]

    def _prepared(self, image: np.ndarray, index: int, count: int) -> np.ndarray:
        """Image `index` of `count` as the network takes it; refused, named by its place."""
        try:
            return preprocess(image, self.input_size)
        except UnreadableImageError as exc:
            raise in_batch(exc, index, count) from None


def detections_in_image(
    scores: np.ndarray,
    boxes: np.ndarray,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
    score_threshold: float,
    max_boxes: int,
    class_agnostic: bool,
    nms_top_k: int = NMS_TOP_K,
) -> np.ndarray:
    """One image's network outputs (scores [N, C], boxes [N, 4] in input pixels) -> its
    detections [M, 6] float32 in the pixels of the image of `image_size` (h, w): boxes
    scaled, NMS, then clipped to the image, as PaddleDetection's post-processing does.
    Detection and training's evaluation share it, so the mAP is that of the boxes detect gives.
    """
    (h, w), (input_h, input_w) = image_size, input_size
    scale = np.array([w, h] * 2, boxes.dtype) / np.array([input_w, input_h] * 2, boxes.dtype)
    dets = multiclass_nms(
        boxes * scale, scores, score_threshold, NMS_IOU, nms_top_k, max_boxes, class_agnostic
    )
    dets[:, [2, 4]] = dets[:, [2, 4]].clip(0, w)
    dets[:, [3, 5]] = dets[:, [3, 5]].clip(0, h)
    return dets.astype(np.float32)


def _check_detect_arguments(score_threshold: float, max_boxes: int) -> None:
    """A ConfigError for values that would quietly give the wrong boxes: a negative
    `max_boxes` slices off the last boxes instead of keeping the first, and a threshold
    outside 0..1 (NaN too) keeps every box or none."""
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, Integral) or max_boxes < 0:
        raise ConfigError(f"max_boxes: expected a whole number >= 0, got {max_boxes!r}")
    # text ("0.5") failed in a bare comparison's TypeError, and True passed as 1.0
    if not is_number(score_threshold) or not 0.0 <= score_threshold <= 1.0:
        raise ConfigError(f"score_threshold: expected a score from 0 to 1, got {score_threshold!r}")


class TorchDetector(Detector["PicoDet"]):
    _releases = "its model"

    def __init__(self, model: PicoDet, input_size: int | None = None) -> None:
        self._resource = model.eval()
        size = check_input_size(model.arch.input_size if input_size is None else input_size)
        self.input_size = (size, size)
        self.class_names = model.arch.class_names
        self.num_classes = model.arch.num_classes

    @property
    def model(self) -> PicoDet:
        """The PicoDet network; a ValueError once the detector is closed."""
        return self._held()

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            scores, boxes = self.model.predict(torch.from_numpy(batch))
        return scores.numpy(), boxes.numpy()


class OnnxDetector(Detector["InferenceSession"]):
    """onnxruntime session over a PaddleDetection PicoDet export or our `export_onnx` file.

    `close()` (or `with`) releases the session once the calls under way end; calls after it
    raise ValueError. Close only when no thread will call again.
    """

    _releases = "its session"

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads  # 0: onnxruntime's default
        # Idle threads sleep rather than spin: a detector runs one photo at a time, between
        # Python pre- and post-processing and the recognition model's runs, and its threads
        # spinning meanwhile took the cores those need (`shitu recognize --detector` on a
        # shared 2-core host: a fifth less CPU time per photo, and faster).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        refuse_non_utf8_path(Path(path), "the detector file's path", "onnxruntime", CheckpointError)
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CheckpointError(f"{path} cannot be opened by onnxruntime: {exc}") from None
        self._resource = session
        image = _single_float_input(session.get_inputs(), path)
        size = image_input_size(image.shape, path)
        if size is None:
            raise CheckpointError(
                f"{path}: onnxruntime runs a detector at the fixed size it was exported for, "
                "and this export's H and W are dynamic; use the torch backend (detect's "
                "--runtime torch, the pipeline's Global.det_backend: torch)"
            )
        self.input_name = image.name
        self.input_size = size
        self.batch_one = image.shape[0] == 1
        outputs = session.get_outputs()
        shapes = [o.shape for o in outputs]
        self.decoded = [o.name for o in outputs] == ["scores", "boxes"] and _decoded_shapes(shapes)
        if not self.decoded:
            self._init_paddle_layout(path, shapes)
        # Our export names its classes in its metadata, which also gives their count where
        # the graph leaves its class axis unsized (exports made before it was sized).
        self.class_names = exported_class_names(session.get_modelmeta().custom_metadata_map)
        width = outputs[0].shape[-1]  # class scores last, in either layout
        self.num_classes = width if isinstance(width, int) else len(self.class_names) or None

    def _init_paddle_layout(self, path: str | Path, shapes: list) -> None:
        levels = len(shapes) // 2
        strides = [8 * 2**i for i in range(levels)]
        sizes = level_shapes(*self.input_size, strides)
        cells = [h * w for h, w in sizes]
        # each level's scores [1, cells, C] and box distributions [1, cells, 4 * (R + 1)]
        per_level = [s[1] if len(s) == 3 else None for s in shapes]
        if len(shapes) % 2 or per_level != cells * 2:
            dims = (", ".join("?" if d is None else str(d) for d in shape) for shape in shapes)
            shown = ", ".join(f"[{text}]" for text in dims)
            if _post_processed_picodet(shapes, self.input_size):
                raise CheckpointError(
                    f"{path}: outputs {shown} are a PicoDet's decoded boxes [1, N, 4] and "
                    "scores [1, classes, N] (PaddleDetection's export with post-processing but "
                    "no NMS, -o export.nms=False, as of its 2022 PicoHeadV2 models), a layout "
                    "shitu does not read; it reads our export's (scores, boxes) and a (legacy, "
                    "PicoHead) PicoDet's per-level scores and box distributions "
                    f"({_PER_LEVEL_PICODET_EXPORT})"
                )
            raise CheckpointError(
                f"{path}: outputs {shown} are neither our export's (scores, boxes) nor "
                f"PicoDet's per-level scores and box distributions ({_PER_LEVEL_PICODET_EXPORT})"
            )
        # PaddleDetection's PicoHead puts each cell's point at its centre (cell_offset 0.5)
        self.points, self.strides = cell_centres(sizes, strides, 0.5)
        self.levels = levels

    @property
    def session(self) -> InferenceSession:
        """The onnxruntime session; a ValueError once the detector is closed."""
        return self._held()

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        session = self.session  # the one session for every image of the batch
        if not self.batch_one:
            return session.run(None, {self.input_name: batch})
        runs = [session.run(None, {self.input_name: batch[i : i + 1]}) for i in range(len(batch))]
        return [np.concatenate(parts) for parts in zip(*runs, strict=True)]

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = self._run(batch)
        if self.decoded:
            return outs[0], outs[1]
        scores = np.concatenate(outs[: self.levels], axis=1)
        reg = np.concatenate(outs[self.levels :], axis=1)
        return scores, decode_distributions(reg, self.points, self.strides)


def _post_processed_picodet(shapes: list[list], input_size: tuple[int, int]) -> bool:
    """Whether two outputs are PicoDet's decoded boxes [B, N, 4] and class-major scores
    [B, C, N], N the cells of its 3 or 4 levels at `input_size`: PaddleDetection's export
    with post-processing but no NMS, which was refused as an unknown graph."""
    if len(shapes) != 2 or any(len(shape) != 3 for shape in shapes):
        return False
    level_cells = [h * w for h, w in level_shapes(*input_size, [8, 16, 32, 64])]
    cells = (sum(level_cells[:3]), sum(level_cells))
    return any(
        boxes[2] == 4 and boxes[1] in cells and scores[2] == boxes[1]
        for boxes, scores in (shapes, shapes[::-1])
    )


def _decoded_shapes(shapes: list[list]) -> bool:
    """Whether two outputs are shaped as our export's scores [B, N, C] and boxes [B, N, 4]
    (dims unsized in the graph pass): outputs of those names shaped otherwise, another
    tool's, failed at the first image with numpy's "operands could not be broadcast"."""
    scores, boxes = shapes
    if len(scores) != 3 or len(boxes) != 3:
        return False
    one_box_count = len({dim for dim in (scores[1], boxes[1]) if isinstance(dim, int)}) < 2
    return one_box_count and (boxes[2] == 4 or not isinstance(boxes[2], int))


def _single_float_input(inputs: list[NodeArg], path: str | Path) -> NodeArg:
    """The one input of a detector graph, which shitu feeds float32 images: a graph that also
    takes other inputs (PaddleDetection's default export, post-processing and NMS inside,
    also wants `scale_factor`) or another type would only fail at the first image."""
    names = [item.name for item in inputs]
    if len(inputs) != 1:
        in_graph_nms = (
            "; PaddleDetection exports post-processing and NMS in the graph unless told not "
            f"to: use {_PER_LEVEL_PICODET_EXPORT}"
            if "scale_factor" in names
            else ""
        )
        raise CheckpointError(
            f"{path}: the graph takes {len(inputs)} inputs {names}; a detector takes one, "
            f"the image batch [N, 3, H, W]{in_graph_nms}"
        )
    if inputs[0].type != "tensor(float)":
        raise CheckpointError(
            f"{path}: input '{names[0]}' is {inputs[0].type}; a detector takes float32 "
            "(tensor(float)) ImageNet-normalised images"
        )
    return inputs[0]


def detectors_held(folder: Path) -> str:
    """'; it holds FOLDER/model.onnx or FOLDER/model.pt' for the detectors that `shitu
    detect-train` writes into `folder` (its --out) and that are there, else ''."""
    exports = [str(folder / name) for name in ("model.onnx", "model.pt")]
    there = [path for path in exports if Path(path).is_file()]
    return f"; it holds {' or '.join(there)}" if there else ""


def load_detector(
    path: str | Path,
    backend: str = "auto",
    arch: str | PicoDetArch | dict | None = None,
    input_size: int | None = None,
    num_threads: int | None = None,
) -> Detector:
    """A detector from our checkpoint (.pt), a PaddleDetection .pdparams (needs `arch`),
    or an ONNX export; `backend` is "auto", "torch" or "onnxruntime". input_size: the side
    (an int, a multiple of 32) it runs at (None: the model's own; an ONNX export runs at its
    own only). num_threads: inference threads (None: the runtime's default; torch's setting
    is process-wide)."""
    refuse_url(path, "detectors", CheckpointError)  # as a Path: `https:/host/picodet.onnx`
    path = Path(path)
    if is_paddle_inference_model(path):
        raise CheckpointError(
            f"{path} is a Paddle inference model, which shitu does not run; give the PicoDet "
            "weights it was exported from (.pdparams, with the architecture's name) or an "
            "ONNX export of it (paddle2onnx)"
        )
    if not path.is_file():
        if not path.exists():
            raise CheckpointError(f"detector file not found: {path}")
        # detect-train's --out, say, given as a recognition model's folder is; a device or
        # a FIFO was "not found"
        kind, held = (
            ("a folder", detectors_held(path)) if path.is_dir() else (special_kind(path.stat()), "")
        )
        raise CheckpointError(
            f"{path} is {kind}, not a detector file; give our checkpoint (.pt), a "
            f"PaddleDetection .pdparams or an ONNX export (.onnx){held}"
        )
    if path.stat().st_size == 0:  # each reader said something else, none of it "empty"
        raise CheckpointError(
            f"{path} is empty (0 bytes), not a detector (a download or copy that never finished?)"
        )
    suffix = path.suffix.lower()
    if backend not in ("auto", "torch", "onnxruntime"):
        raise ConfigError(f"unknown detector backend '{backend}' (auto, torch, onnxruntime)")
    if num_threads:
        check_thread_count(num_threads, "num_threads")
    if input_size is not None:  # an ONNX export's size is compared with it: "416" never matched
        check_input_size(input_size)
    if suffix == ".onnx" and backend != "torch":
        _ignored_arch(path, arch, "onnxruntime runs the graph it holds")
        detector = OnnxDetector(path, threads=num_threads or 0)
        if input_size is not None and (input_size, input_size) != detector.input_size:
            raise ConfigError(
                f"{path}: an ONNX detector runs at the size it was exported for, "
                f"{detector.input_size[1]}x{detector.input_size[0]}; another input size "
                f"({input_size}: detect's --input-size, the pipeline's DetPreProcess "
                "DetResize target_size) needs the torch backend (detect's --runtime torch, "
                "the pipeline's Global.det_backend: torch)"
            )
        return detector
    if backend == "onnxruntime":  # named with the way to an .onnx file, and the other way
        raise ConfigError(
            f"{path}: the onnxruntime backend (detect's --runtime onnxruntime, the pipeline's "
            "Global.det_backend) runs .onnx files; write this one as one with `shitu "
            f"detect-export {shlex.quote(str(path))} --out FILE.onnx` (a .pdparams with "
            "--det-arch), or run it with the torch backend"
        )
    # Our PyTorch PicoDet, with the file's weights.
    import torch

    from shitu.detection.model import ARCHS
    from shitu.detection.weights import load_detector_checkpoint, load_onnx_weights, load_pdparams

    if num_threads:
        torch.set_num_threads(num_threads)  # process-wide, as the recogniser's torch backend
    # Said with where an architecture is named (the commands' --det-arch, a pipeline
    # config's Global.det_arch; load_detector's arch= for a Python caller) and the names.
    where = "--det-arch, the pipeline's Global.det_arch"
    if isinstance(arch, str) and arch not in ARCHS and suffix in (".onnx", ".pdparams"):
        raise ConfigError(
            f"unknown detector architecture '{arch}' ({where}); known: {', '.join(ARCHS)}"
        )
    if suffix == ".onnx":
        return TorchDetector(load_onnx_weights(path, arch), input_size)
    if suffix == ".pdparams":
        if arch is None:
            raise ConfigError(
                f"{path}: a .pdparams file holds only weights; name its architecture ({where}), "
                f"one of {', '.join(ARCHS)}"
            )
        return TorchDetector(load_pdparams(path, arch), input_size)
    _ignored_arch(path, arch, "our checkpoints carry their own")
    return TorchDetector(load_detector_checkpoint(path), input_size)


def is_paddle_inference_model(path: Path) -> bool:
    """A Paddle inference model's weights or graph file (Paddle 3 writes the graph as
    `model.json` beside `model.pdiparams`), or the folder holding them (as PP-ShiTu's
    configs name their detector): weights shitu cannot read, which would otherwise be
    refused as an unreadable checkpoint or a folder."""
    if path.is_dir():
        return any(child.suffix.lower() == ".pdiparams" for child in path.iterdir())
    if path.suffix.lower() == ".json":
        return path.is_file() and path.with_suffix(".pdiparams").is_file()
    return path.is_file() and path.suffix.lower() in PADDLE_INFERENCE_SUFFIXES


def _ignored_arch(path: Path, arch: object, why: str) -> None:
    """An architecture name only shapes .pdparams and ONNX weights read into torch: say so
    when one is given for a file that does not use it, rather than drop it unnoticed."""
    if arch is not None:
        logger.warning("%s: the detector architecture given is not used (%s)", path, why)
