"""Where the model shipped with shitu lives, so commands can work without `--model`."""

from __future__ import annotations

from pathlib import Path

from shitu.errors import CheckpointError
from shitu.inference.manifest import MANIFEST, read_manifest

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"


def default_model_dir() -> Path:
    """The shipped exported model folder; a clear error if this install lacks it."""
    if not (DEFAULT_MODEL_DIR / MANIFEST).is_file():
        raise CheckpointError(
            f"the default model is missing from this install ({DEFAULT_MODEL_DIR}); "
            "reinstall shitu, or pass --model with a folder from `shitu export`"
        )
    return DEFAULT_MODEL_DIR


def default_model_fingerprint() -> str | None:
    """The shipped model's fingerprint (as fp32 features), so that a library built with it
    can be told apart; None if this install lacks the model."""
    try:
        return str(read_manifest(DEFAULT_MODEL_DIR)["fingerprint"])
    except (CheckpointError, KeyError):
        return None
