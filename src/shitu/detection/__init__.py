"""Stage one of recognition: find the objects in a photo (PP-PicoDet in PyTorch).

`load_detector(path)` accepts our checkpoints, PaddleDetection `.pdparams` (with the
architecture name) and ONNX exports; `Detector.detect(image)` returns boxes
`[cls, score, x1, y1, x2, y2]` in the image's own pixels, best first.
"""

from typing import TYPE_CHECKING

from shitu.lazy import lazy_exports

if TYPE_CHECKING:  # loaded on first use (see shitu.lazy)
    from shitu.detection.detector import Detector, OnnxDetector, TorchDetector, load_detector
    from shitu.detection.model import ARCHS, PicoDet, PicoDetArch, build_picodet

__all__ = [
    "ARCHS",
    "Detector",
    "OnnxDetector",
    "PicoDet",
    "PicoDetArch",
    "TorchDetector",
    "build_picodet",
    "load_detector",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "detector": ("Detector", "OnnxDetector", "TorchDetector", "load_detector"),
        "model": ("ARCHS", "PicoDet", "PicoDetArch", "build_picodet"),
    },
)
