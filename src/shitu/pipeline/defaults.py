"""The pipeline's shipped configs and its defaults: plain values, which the command line's
options show without loading the config schema or any model (see `shitu.pipeline.config`)."""

from pathlib import Path

PIPELINE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "pipeline"
DEFAULT_PIPELINE_CONFIG = "inference_general"
NO_DETECTOR = "none"
PLAIN_BACKGROUND = "plain-background"
# PP-ShiTuV2's score_thres: used when neither the config nor the model sets one.
DEFAULT_SCORE_THRES = 0.5
# The finest step of a threshold sweep (`sweep_thresholds`): 1001 thresholds; each is every
# query's selection again, and a step of 1e-5 takes 100001 (14 s for 4 queries), one below
# 1e-6 thresholds off its grid (rounded to 6 decimals).
MIN_SWEEP_STEP = 0.001
# The settings that `shitu recognize` takes as flags and `Recognizer.open` as keywords, by
# the config key each one writes over.
SETTINGS = {
    "gallery": ("IndexProcess", "index_dir"),
    "score_thres": ("IndexProcess", "score_thres"),
    "model": ("Global", "rec_inference_model_dir"),
    "detector": ("Global", "det_inference_model_dir"),
    "det_arch": ("Global", "det_arch"),
    "threads": ("Global", "cpu_num_threads"),
    "runtime": ("Global", "rec_backend"),
    "precision": ("Global", "rec_precision"),
}
