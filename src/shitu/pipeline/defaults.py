"""The pipeline's shipped configs and its defaults: plain values, which the command line's
options show without loading the config schema or any model (see `shitu.pipeline.config`)."""

from pathlib import Path

PIPELINE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "pipeline"
DEFAULT_PIPELINE_CONFIG = "inference_general"
NO_DETECTOR = "none"
PLAIN_BACKGROUND = "plain-background"
# PP-ShiTuV2's score_thres: used when neither the config nor the model sets one.
DEFAULT_SCORE_THRES = 0.5
