"""Training checkpoints: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from shitu.engine.metrics_log import LOG_NAME
from shitu.errors import CheckpointError, override_word
from shitu.fileio import from_working_directory, torch_save_atomically

LATEST = "latest"
BEST = "best_model"
FINAL = "final_model"
SUFFIX = ".pt"
# What a run leaves in its output folder, the resumable checkpoint first.
RUN_FILES = (f"{LATEST}{SUFFIX}", f"{FINAL}.safetensors", f"{BEST}.safetensors", LOG_NAME)
FORMAT_VERSION = 1
# Weight files a run writes or starts from, never a checkpoint; torch.load cannot read them.
WEIGHTS_ONLY_SUFFIXES = (".safetensors", ".pdparams")


@dataclass
class Progress:
    """Where a run is: `epoch` in progress (0-based), batches done in it, global step."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    best_metric_name: str | None = None  # the Global.eval_metric best_metric is a value of


def resolve_checkpoint(path: str | Path, option: str = "Global.checkpoints") -> Path:
    """Accept `.../latest.pt`, `.../latest` (PaddleClas style) or the output directory.
    `option` names the setting that gave `path`, for the message."""
    path = Path(path)
    candidates = [path, path.with_name(path.name + SUFFIX), path / f"{LATEST}{SUFFIX}"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    # A run's folder without its latest.pt still has weights a new run can start from
    # (not so for detect-train's --resume, whose runs keep none of these).
    weights = [path / f"{name}.safetensors" for name in (BEST, FINAL)]
    found = next((file for file in weights if file.is_file()), None)
    start = ""
    if found is not None and option.startswith("Global."):
        weights_word = override_word("Global.pretrained_model", found)
        start = f"; to start a new run from its weights, -o {weights_word}"
    raise CheckpointError(
        f"{option}: no training checkpoint at {path} "
        f"(give a {LATEST}{SUFFIX} file or the output directory holding one){start}"
        f"{from_working_directory(path)}"
    )


def save_training_state(path: Path, state: dict[str, Any], progress: Progress) -> Path:
    """Write atomically (temp file + rename) and durably (synced before and after the
    rename): a crash or a full disk never leaves a half-written checkpoint, and the one
    `path` held stays. Without the sync, a power loss or a host crash soon after the
    rename could leave `path` empty on some file systems, with the run's only checkpoint
    gone. A refused write (a full disk, no permission) is a CheckpointError naming `path`."""
    payload = {"format_version": FORMAT_VERSION, "progress": asdict(progress), **state}
    return torch_save_atomically(payload, path, durable=True)


# A key only one trainer's checkpoints hold, telling them apart; how to resume each.
_KINDS = {
    "recognition": ("seed", "shitu train -o Global.checkpoints=..."),
    "detector": ("arch", "shitu detect-train --resume ..."),
}


def training_state_kind(payload: object) -> str | None:
    """Which trainer (a `_KINDS` name) wrote `payload`, loaded from a .pt file; None for
    anything else, such as weights alone."""
    if not isinstance(payload, dict) or "progress" not in payload:
        return None
    return next((name for name, (key, _) in _KINDS.items() if key in payload), None)


def load_training_state(
    path: str | Path, option: str = "Global.checkpoints", kind: str = "recognition"
) -> tuple[dict[str, Any], Progress]:
    """The checkpoint of a `kind` run ("recognition" or "detector") and where it stopped."""
    path = resolve_checkpoint(path, option)
    hint = (
        "use -o Global.pretrained_model=... to start from weights"
        if option.startswith("Global.")
        else f"{option} takes the run's {LATEST}{SUFFIX} or its output directory"
    )
    if path.suffix.lower() in WEIGHTS_ONLY_SUFFIXES:
        raise CheckpointError(f"{path} is a weights file, not a training checkpoint; {hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # for an .onnx or a JSON, torch prints a page advising weights_only=False
        raise CheckpointError(
            f"{option} {path}: not a readable training checkpoint (expected the "
            f"{LATEST}{SUFFIX} a training run writes, or its output directory)"
        ) from None
    if not isinstance(payload, dict) or "progress" not in payload or "model" not in payload:
        raise CheckpointError(f"{path} is a weights file, not a training checkpoint; {hint}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload.get('format_version')}, "
            f"this shitu reads {FORMAT_VERSION}"
        )
    found = training_state_kind(payload)
    if found != kind:
        resume = f"; resume it with `{_KINDS[found][1]}`" if found else ""
        what = f"a {found}" if found else "an unrecognised"
        raise CheckpointError(
            f"{option} {path}: {what} training checkpoint, not a {kind} one{resume}"
        )
    return payload, Progress(**payload["progress"])
