"""What an export folder holds and how loading checks it, without torch: the ONNX runtimes
read these (file names, the manifest, the fingerprint of the weights) and load no torch.

`shitu.inference.export`, which writes exports, imports its names from here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from shitu import __version__
from shitu.config.schema import TRAINING_ONLY_ARCH
from shitu.errors import CheckpointError, ShituError, did_you_mean
from shitu.fileio import read_text, refuse_non_utf8_path
from shitu.inference.preprocess import Preprocessing

if TYPE_CHECKING:
    import torch

MANIFEST = "shitu_model.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TORCH_FILE = "model.safetensors"
# Everything an export folder may hold; re-exporting replaces the folder with all of it.
EXPORT_FILES = (MANIFEST, ONNX_FILE, INT8_FILE, TORCH_FILE)
FORMAT = "shitu-feature-extractor"
# 2: the fingerprint covers the arch too (version 1's covered weights, preprocessing and
# output key only); version 1 exports still load, checked against their own kind.
FORMAT_VERSION = 2
# What PaddleClas's own export writes (with inference.pdmodel or inference.json): the
# folders PP-ShiTu's pipeline config names as rec_inference_model_dir.
PADDLE_INFERENCE_WEIGHTS = "inference.pdiparams"
PADDLE_INFERENCE_SUFFIXES = (".pdiparams", ".pdmodel")
PADDLE_INFERENCE_UNREAD = (
    "whose weights shitu does not read: give the PaddleClas weights (.pdparams) it was "
    "exported from"
)
# What `shitu train` writes into its Global.output_dir (shitu.engine.state's BEST and FINAL),
# best first: a folder easily given as the model in place of the export made from it.
TRAINING_RUN_WEIGHTS = ("best_model.safetensors", "final_model.safetensors")
# What PaddleClas's training writes into its output folder (output/RecModel/), best first.
PADDLE_TRAINING_WEIGHTS = ("best_model.pdparams", "latest.pdparams")
# The database of a gallery library (shitu.index's LIBRARY_FILE): a library is easily given
# as the model that built it.
LIBRARY_DATABASE = "gallery.sqlite"
INPUT_NAME = "images"
OUTPUT_NAME = "features"
# Every entry of a manifest, as `write_export` writes it, the entries loading requires
# (_MANIFEST_ENTRIES, with their types) among them. Another is ignored, as a newer shitu
# may add entries within a format version, but named: a misspelt `score_threshold` left
# the model's calibrated score_thres unset without a word.
KNOWN_ENTRIES = (
    "format",
    "format_version",
    "shitu_version",
    "torch_version",
    "arch_name",
    "arch",
    "output_key",
    "embedding_size",
    "input",
    "output",
    "preprocessing",
    "fingerprint",
    "score_thres",
    "source_weights",
    "weights_dtype",
    "onnx_opset",
    "files",
)

logger = logging.getLogger(__name__)


class ExportError(ShituError):
    """An export could not be written or does not reproduce the torch model."""


def fingerprint(
    state: Mapping[str, np.ndarray | torch.Tensor],
    preprocessing: Preprocessing,
    key: str,
    arch: dict[str, Any] | None,
) -> str:
    """sha256 of what the features depend on: the weights (names, dtypes, shapes, bytes),
    the arch (settings without weights, such as a stride or an activation, change the
    features of the same weights), preprocessing and output key. `arch` None gives a
    format-version-1 export's fingerprint, which left the arch out. `state`: a model's
    tensors or a weight file's numpy arrays, which give the same fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        array = value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
        # dtypes as torch names them ("torch.float32"), as fingerprints always have
        digest.update(f"{name}:torch.{array.dtype}:{array.shape}\n".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(preprocessing.to_dict(), sort_keys=True).encode())
    digest.update(key.encode())
    if arch is not None:
        # Exports differing only in training settings give the same features, so they keep
        # one fingerprint (and one gallery stays valid for both).
        shaping = {name: value for name, value in arch.items() if name not in TRAINING_ONLY_ARCH}
        digest.update(json.dumps(shaping, sort_keys=True).encode())
    return digest.hexdigest()


def check_fingerprint(
    model_dir: str | Path,
    manifest: dict[str, Any],
    state: Mapping[str, np.ndarray | torch.Tensor] | None = None,
) -> None:
    """A CheckpointError unless the export's weights (`state`, the loaded model's; None: its
    weight file's, for the ONNX runtimes, which do not load them) and settings give the
    fingerprint its manifest records."""
    if state is None:
        path = Path(model_dir) / TORCH_FILE  # float32: not a compact export
        refuse_non_utf8_path(path, "the weight file's path", "safetensors", CheckpointError)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    arch = manifest["arch"] if manifest["format_version"] >= 2 else None
    if fingerprint(state, preprocessing, manifest["output_key"], arch) != manifest["fingerprint"]:
        raise CheckpointError(
            f"{model_dir}: its weights and settings (arch, preprocessing) do not give the "
            f"fingerprint its {MANIFEST} records (edited or corrupt model folder?)"
        )


def weight_file_in(folder: Path) -> str:
    """What `folder` is and which weight file to give for it, where one is expected ('<path>
    is ...'): a training run (its best, else final weights), an export (its torch weights),
    a gallery library or a Paddle inference model (which hold none that shitu reads)."""
    trained = [folder / name for name in TRAINING_RUN_WEIGHTS if (folder / name).is_file()]
    if trained:
        best = trained[0].name == TRAINING_RUN_WEIGHTS[0]
        return f"a training run's folder: give its weights, {trained[0]}" + (
            " (the best evaluated epoch's)" if best else ""
        )
    paddle = next((folder / n for n in PADDLE_TRAINING_WEIGHTS if (folder / n).is_file()), None)
    if paddle is not None:
        return f"a PaddleClas training run's folder: give its weights, {paddle}"
    if (folder / MANIFEST).is_file():
        if (folder / TORCH_FILE).is_file():
            return f"an exported model's folder: give its weights, {folder / TORCH_FILE}"
        return (
            f"an exported model's folder without its torch weights ({TORCH_FILE}): give the weight "
            "file it was exported from"
        )
    if (folder / LIBRARY_DATABASE).is_file():
        return (
            "a gallery library, which holds features, not weights: give the weight file of "
            "the model that built it"
        )
    if (folder / PADDLE_INFERENCE_WEIGHTS).is_file():
        return f"a Paddle inference model, {PADDLE_INFERENCE_UNREAD}"
    return (
        f"a folder, not a weight file: give one (an export's is its {TORCH_FILE}, a training run's "
        f"its {TRAINING_RUN_WEIGHTS[0]})"
    )


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of an exported folder (CheckpointError if it is not one)."""
    path = Path(model_dir) / MANIFEST
    if not Path(model_dir).exists():
        raise CheckpointError(f"model {model_dir}: no such folder")
    if Path(model_dir).is_file():  # e.g. the export's model.onnx for the export
        folder = Path(model_dir).parent
        if (folder / MANIFEST).is_file():
            hint = f": {folder}"
        elif Path(model_dir).suffix.lower() == ".onnx":  # a detector, or another tool's export
            hint = (
                " (an ONNX file alone records no preprocessing, so it is not one; a PicoDet "
                "detector's goes to --detector)"
            )
        else:  # most often a training run's weights, which come in a file of their own
            hint = (
                f" (for a weight file, `shitu export -c CONFIG -o Global.pretrained_model="
                f"{model_dir} --out DIR` makes one)"
            )
        raise CheckpointError(f"model {model_dir} is a file; give the folder of an export{hint}")
    if not path.is_file():
        if (Path(model_dir) / PADDLE_INFERENCE_WEIGHTS).is_file():  # PP-ShiTu's own models
            raise CheckpointError(
                f"{model_dir} is a Paddle inference model, which shitu does not run: export "
                "the PaddleClas weights (.pdparams) it was made from with `shitu export -c "
                "CONFIG -o Global.pretrained_model=FILE.pdparams --out DIR`"
            )
        trained = [Path(model_dir) / name for name in TRAINING_RUN_WEIGHTS]
        weights = next((path for path in trained if path.is_file()), None)
        if weights is not None:
            raise CheckpointError(
                f"{model_dir} is a training run's folder, not an exported model: export its "
                f"weights first, `shitu export -c CONFIG -o Global.pretrained_model={weights} "
                "--out DIR`, and give DIR"
            )
        if (Path(model_dir) / LIBRARY_DATABASE).is_file():
            library = CheckpointError(
                f"{model_dir} is a gallery library, not an exported model: give it as --gallery "
                "(and as --model the export that built it, or none for the shipped model)"
            )
            library.names_shipped_model = True
            raise library
        raise CheckpointError(
            f"{model_dir} is not an exported model (no {MANIFEST}); create one with `shitu export`"
        )
    try:
        # as editors save it: a manifest edited by hand in Notepad starts with a BOM
        manifest = json.loads(read_text(path))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest (edited by hand?)")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version}, written by a newer shitu than this one "
            f"({__version__}, which reads versions 1 to {FORMAT_VERSION}): upgrade shitu, or "
            "export the model again with this one"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        shown = "missing" if "format_version" not in manifest else json.dumps(version)
        raise CheckpointError(
            f"{path}: format_version must be a whole number from 1 to {FORMAT_VERSION}, is "
            f"{shown} (edited by hand? export the model again)"
        )
    _check_entries(path, manifest)
    return manifest


# What loading a model requires of its manifest: the JSON type each entry must have (all
# of them among KNOWN_ENTRIES).
_MANIFEST_ENTRIES = {
    "arch": (dict, "an object"),
    "output_key": (str, "a string"),
    "embedding_size": (int, "a whole number >= 1"),
    "preprocessing": (dict, "an object"),
    "fingerprint": (str, "a string"),
    "files": (dict, "an object"),
}


def warn_of_unknown_entries(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Warn of each entry of the export's manifest that shitu does not read (a hand edit's
    misspelt name, a newer shitu's entry), which is ignored, with the entry meant where
    one is close."""
    for name in manifest:
        if name not in KNOWN_ENTRIES:
            logger.warning(
                "%s: %r is not an entry shitu %s reads, so it is ignored%s",
                Path(model_dir) / MANIFEST,
                name,
                __version__,
                did_you_mean(name, list(KNOWN_ENTRIES)),
            )


def _check_entries(path: Path, manifest: dict[str, Any]) -> None:
    """A CheckpointError naming the first entry that is missing or malformed (a hand-edited
    or truncated manifest), instead of a KeyError or ValueError deep inside loading."""
    for name, (kind, described) in _MANIFEST_ENTRIES.items():
        value = manifest.get(name)
        if (
            not isinstance(value, kind)
            or isinstance(value, bool)
            or (kind is int and isinstance(value, int) and value < 1)
        ):
            shown = "missing" if name not in manifest else json.dumps(value)[:80]
            raise CheckpointError(
                f"{path}: {name} must be {described}, is {shown} (edited by hand? export the "
                "model again)"
            )
    try:
        Preprocessing.from_dict(manifest["preprocessing"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: preprocessing: {exc} (edited by hand?)") from None
