"""The recognition system: mainbody boxes -> crops -> embeddings -> gallery search -> labels."""

from typing import TYPE_CHECKING

from shitu.lazy import lazy_exports

if TYPE_CHECKING:  # loaded on first use (see shitu.lazy)
    from shitu.pipeline.background import PlainBackgroundDetector
    from shitu.pipeline.config import PipelineConfig, load_pipeline_config
    from shitu.pipeline.evaluate import PipelineEvaluation, evaluate_pipeline
    from shitu.pipeline.fonts import CaptionFonts
    from shitu.pipeline.recognizer import FileRecognition, Recognition, Recognizer, build_detector
    from shitu.pipeline.visualize import draw_boxes, draw_results

__all__ = [
    "CaptionFonts",
    "FileRecognition",
    "PipelineConfig",
    "PipelineEvaluation",
    "PlainBackgroundDetector",
    "Recognition",
    "Recognizer",
    "build_detector",
    "draw_boxes",
    "draw_results",
    "evaluate_pipeline",
    "load_pipeline_config",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "background": ("PlainBackgroundDetector",),
        "config": ("PipelineConfig", "load_pipeline_config"),
        "evaluate": ("PipelineEvaluation", "evaluate_pipeline"),
        "fonts": ("CaptionFonts",),
        "recognizer": ("FileRecognition", "Recognition", "Recognizer", "build_detector"),
        "visualize": ("draw_boxes", "draw_results"),
    },
)
