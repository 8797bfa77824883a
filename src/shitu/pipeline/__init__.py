"""The recognition system: mainbody boxes -> crops -> embeddings -> gallery search -> labels."""

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
