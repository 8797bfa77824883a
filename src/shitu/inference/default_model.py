"""Where the model shipped with shitu lives, so commands can work without `--model`."""

from __future__ import annotations

import shlex
from pathlib import Path

from shitu.errors import CheckpointError
from shitu.inference.manifest import MANIFEST, TORCH_FILE, read_manifest

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
# The shipped config the shipped model was trained with: an export of its weights with it
# has the shipped model's features (the same fingerprint).
DEFAULT_MODEL_CONFIG = "GroceryStore_EfficientNetLite0"


def default_model_dir() -> Path:
    """The shipped exported model folder; a clear error if this install lacks it."""
    if not (DEFAULT_MODEL_DIR / MANIFEST).is_file():
        raise CheckpointError(
            f"the default model is missing from this install ({DEFAULT_MODEL_DIR}); "
            "reinstall shitu, or pass --model with a folder from `shitu export`"
        )
    return DEFAULT_MODEL_DIR


def is_shipped_model(model_dir: Path) -> bool:
    """Whether `model_dir` is the model shipped with shitu, which no `shitu export` of the
    user's made: advice for it names reinstalling, or the whole export command."""
    return Path(model_dir).resolve() == DEFAULT_MODEL_DIR.resolve()


def default_model_fingerprint() -> str | None:
    """The shipped model's fingerprint (as fp32 features), so that a library built with it
    can be told apart; None if this install lacks the model."""
    try:
        return str(read_manifest(DEFAULT_MODEL_DIR)["fingerprint"])
    except (CheckpointError, KeyError):
        return None


def default_int8_export_command() -> str:
    """The `shitu export` command that gives the shipped model (compact: no int8 file) an
    int8 file calibrated on YOUR_PHOTOS, keeping its recognition threshold: the user has
    neither its config's name nor its weights' path in mind."""
    threshold = read_manifest(DEFAULT_MODEL_DIR).get("score_thres")
    words = ["shitu", "export", "-c", DEFAULT_MODEL_CONFIG]
    words += ["-o", f"Global.pretrained_model={DEFAULT_MODEL_DIR / TORCH_FILE}"]
    words += ["--int8-calibration", "YOUR_PHOTOS"]
    words += [] if threshold is None else ["--score-thres", str(threshold)]
    return shlex.join([*words, "--out", "default_int8"])
