"""Inference: export a trained model (ONNX + torch, preprocessing recorded) and extract
L2-normalised features from image files or arrays with onnxruntime or torch."""

from typing import TYPE_CHECKING

from shitu.lazy import lazy_exports

if TYPE_CHECKING:  # loaded on first use (see shitu.lazy)
    from shitu.inference.default_model import default_model_dir, default_model_fingerprint
    from shitu.inference.export import export_model
    from shitu.inference.extractor import ExtractionResult, FeatureExtractor
    from shitu.inference.manifest import read_manifest
    from shitu.inference.preprocess import Preprocessing, decode_rgb, read_rgb

__all__ = [
    "ExtractionResult",
    "FeatureExtractor",
    "Preprocessing",
    "decode_rgb",
    "default_model_dir",
    "default_model_fingerprint",
    "export_model",
    "read_manifest",
    "read_rgb",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "default_model": ("default_model_dir", "default_model_fingerprint"),
        "export": ("export_model",),
        "manifest": ("read_manifest",),
        "extractor": ("ExtractionResult", "FeatureExtractor"),
        "preprocess": ("Preprocessing", "decode_rgb", "read_rgb"),
    },
)
