"""Export a config's model for inference: re-parameterised, features only, ONNX + torch.

The exported folder is all inference needs (no config file):
    model.onnx          dynamic batch, input `images` (float32 NCHW), output `features`
                        (absent from a compact export: rebuilt into the user cache on load)
    model.safetensors   the same folded weights (metadata holds the Arch to rebuild it;
                        float16 in a compact export)
    model.int8.onnx     optional, statically quantised with calibration images
    shitu_model.json    preprocessing, embedding size, arch, fingerprint, versions, file hashes
It is written into a temporary sibling folder and renamed into place, so an export that is
killed half-way leaves no half-written folder behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from shitu import __version__, registry
from shitu.checkpoint import load_weights, model_metadata, save_weights
from shitu.checkpoint.io import WEIGHT_SUFFIXES, non_finite_tensors, settings_as_built
from shitu.config import ArchConfig, ShituConfig, load_config
from shitu.errors import CheckpointError, ConfigError, did_you_mean, first_few
from shitu.fileio import (
    FILE_MODE,
    FOLDER_MODE,
    expanded_path,
    file_sha256,
    folder_place,
    refuse_non_utf8_path,
    removed_if_left_empty,
    replace_folder,
    staging_folder,
    write_failure_reason,
)
from shitu.inference.manifest import (
    EXPORT_FILES,
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    INT8_FILE,
    MANIFEST,
    ONNX_FILE,
    OUTPUT_NAME,
    TORCH_FILE,
    ExportError,
    check_fingerprint,
    fingerprint,
)
from shitu.inference.preprocess import Preprocessing
from shitu.models import RecModel, build_model
from shitu.onnx_trace import trace_to_onnx
from shitu.registry import format_validation_error
from shitu.values import is_number

OPSET = 17
# Largest |ONNX - torch| difference accepted when an export checks itself, relative to the
# largest feature (at least 1): float32 rounding grows with the features' scale, and
# ResNet50's raw features (components near 200) differ by about 1e-4 on a correct export.
EXPORT_TOLERANCE = 1e-4

logger = logging.getLogger(__name__)


class FeaturesOnly(nn.Module):
    """The deployed graph: image batch -> embedding (RecModel returns a dict of stages)."""

    def __init__(self, model: RecModel, output_key: str = "features") -> None:
        super().__init__()
        self.model = model
        self.output_key = output_key

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[self.output_key]


# Component settings an export records even at their default, filled in where a config
# leaves them out: the shipped model's arch, which its fingerprint covers, has BNNeck's
# bias_frozen written out (as both shipped configs write it), and the libraries built with
# it must keep taking the same weights exported again.
RECORDED_AT_DEFAULT = {"BNNeck": ("bias_frozen",)}


def inference_arch(arch: ArchConfig) -> dict[str, Any]:
    """The Arch without head, without `pretrained` (the weights come from the export) and
    with its components' settings at their defaults recorded one way (left out by
    `settings_as_built`, RECORDED_AT_DEFAULT's written out): the fingerprint covers the
    arch as recorded, and a config that writes a default out (`-o
    Arch.Backbone.last_stride=1`) builds the model that one leaving it out does, whose
    libraries must take either export."""
    data = arch.model_dump(mode="json")
    data["Head"] = None
    data["Backbone"].pop("pretrained", None)
    for section, components in (("Backbone", registry.BACKBONES), ("Neck", registry.NECKS)):
        if data[section] is None:
            continue
        settings = data[section] = settings_as_built(data[section], components)
        name = settings["name"]
        for key in RECORDED_AT_DEFAULT.get(name, ()) if name in components else ():
            settings.setdefault(key, components.params_model(name).model_fields[key].default)
    return data


def export_model(
    config: ShituConfig | str | Path,
    weights: str | Path | None,
    out_dir: str | Path,
    *,
    calibration_images: Sequence[str | Path] = (),
    calibration_count: int | None = None,
    opset: int = OPSET,
    compact: bool = False,
    score_thres: float | None = None,
    progress: bool = False,
) -> Path:
    """Export `config`'s model with `weights` (None: as initialised) to `out_dir`; returns it.

    config: a `shitu.config.load_config(...)`, or the YAML file (or shipped name) it would
    load without overrides, as `Recognizer.from_config` takes its config.

    calibration_images: image files for int8 static quantisation (model.int8.onnx); none
    means no int8 model. calibration_count: use at most this many of them, spread over
    the list (None: all). compact, score_thres, progress: see `write_export`. An existing export at
    `out_dir` is replaced; any other existing folder, or an export that also holds other
    files, is an error (nothing of the user's is deleted).
    """
    if isinstance(config, str | Path):
        config = load_config(config)
    elif not isinstance(config, ShituConfig):  # else an AttributeError on `.Arch`
        raise ConfigError(
            "config: expected a ShituConfig (shitu.config.load_config(name_or_path, "
            f"overrides)) or a config file's path, got {type(config).__name__}"
        )
    arch = inference_arch(config.Arch)
    if weights:
        model = build_model(ArchConfig.model_validate(arch)).eval()
        features = {key: value for key, value in arch.items() if key != "Head"}
        load_weights(model, weights, strict=True, ignore_prefixes=("head.",), arch=features)
    else:  # as the config initialises it, e.g. with an ImageNet backbone
        model = build_model(config.Arch.model_copy(update={"Head": None})).eval()
    model.reparameterize()
    return write_export(
        model,
        arch,
        config.Arch.infer_output_key,
        Preprocessing.from_config(config),
        out_dir,
        source=str(weights) if weights else None,
        calibration_images=calibration_images,
        calibration_count=calibration_count,
        opset=opset,
        compact=compact,
        score_thres=score_thres,
        progress=progress,
    )


def write_export(
    model: RecModel,
    arch: dict[str, Any],
    output_key: str,
    preprocessing: Preprocessing,
    out_dir: str | Path,
    *,
    source: str | None,
    calibration_images: Sequence[str | Path] = (),
    calibration_count: int | None = None,
    opset: int = OPSET,
    compact: bool = False,
    score_thres: float | None = None,
    format_version: int = FORMAT_VERSION,
    progress: bool = False,
) -> Path:
    """Write the export folder of a built, folded, eval-mode `model`.

    compact: weights rounded to and stored as float16, no ONNX file (half the size, for
    shipping a model in a package); `FeatureExtractor.load` rebuilds the ONNX model from it
    once, into the user cache, with the same fingerprint. score_thres: the cosine
    similarity this model's best gallery hit needs to count as recognised (calibrated with
    `shitu eval-pipeline --sweep`); the recogniser uses it unless told another. Features do
    not depend on it, so it is not part of the fingerprint. format_version: 1 writes a
    version-1 fingerprint (without the arch), for the cached rebuild of a version-1 export.
    progress: a bar on stderr while the int8 model is calibrated.
    """
    out_dir = expanded_path(out_dir)
    place = folder_place(out_dir)  # where a link given as out_dir points, as index build
    # Each file is written and read back by its path in the staging folder beside it.
    readers = "torch's ONNX exporter, onnxruntime and safetensors"
    refuse_non_utf8_path(place, "the export folder's path", readers, ExportError)
    check_export_target(out_dir)
    # true (as 1) and text were compared as numbers: an export loading refuses, or a TypeError
    if score_thres is not None:
        if not is_number(score_thres) or not -1.0 <= score_thres <= 1.0:
            raise ExportError(
                f"score_thres {score_thres!r}: a cosine similarity, a number in [-1, 1]"
            )
        score_thres = float(score_thres)  # numpy's float32 (a sweep's) is no JSON number
    if isinstance(calibration_images, str | Path):  # a str is a sequence of characters
        raise ExportError(
            f"calibration_images {str(calibration_images)!r}: a list of image files, not one "
            "path (a folder's images: shitu.image_files.scan_images(Path(folder)))"
        )
    if compact and calibration_images:
        raise ExportError(
            "compact with int8 calibration images (--compact --int8-calibration): a compact "
            "export has no ONNX model to quantise; give one or the other"
        )
    calibration: list[np.ndarray] = []
    if calibration_images:
        from shitu.inference.quantize import calibration_batches

        calibration = calibration_batches(preprocessing, calibration_images, calibration_count)
    _check_finite(model, source, "(weights of a training run that diverged?)")
    if compact:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.half())
        _check_finite(model, source, "once rounded to float16: export it without --compact")
    wrapped = FeaturesOnly(model, output_key).eval()
    with torch.inference_mode():
        probe = wrapped(torch.zeros(1, 3, *reversed(preprocessing.size)))
    if not bool(torch.isfinite(probe).all()):  # finite weights can give NaN features
        where = f"{source}: " if source else ""
        raise ExportError(
            f"{where}the model's features hold NaN or infinite values, though its weights are "
            "finite (a batch norm's running_var below 0?)"
        )
    state = model.state_dict()
    stored = {
        name: tensor.half() if compact and tensor.is_floating_point() else tensor
        for name, tensor in state.items()
    }
    with contextlib.ExitStack() as staged:
        staged.enter_context(removed_if_left_empty(place.parent))  # made here, then failed
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            # Beside the target, and removed by the next export there if this one is killed
            staging = staged.enter_context(staging_folder(place, "exporting"))
            staging.mkdir(mode=0o700)
        except OSError as exc:
            raise _write_refused(out_dir, exc) from None
        try:
            save_weights(stored, staging / TORCH_FILE, model_metadata(model, arch))
            files = [TORCH_FILE]
            if not compact:
                _export_onnx(wrapped, staging / ONNX_FILE, preprocessing, opset, out_dir)
                files.insert(0, ONNX_FILE)
            if calibration:
                from shitu.inference.quantize import quantize_calibrated

                quantize_calibrated(staging / ONNX_FILE, staging / INT8_FILE, calibration, progress)
                files.append(INT8_FILE)
            manifest = {
                "format": FORMAT,
                "format_version": format_version,
                "shitu_version": __version__,
                "torch_version": torch.__version__,
                "arch_name": arch["Backbone"]["name"],
                "arch": arch,
                "output_key": output_key,
                "embedding_size": int(probe.shape[1]),
                "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW"},
                "output": {"name": OUTPUT_NAME, "normalized": False},
                "preprocessing": preprocessing.to_dict(),
                "fingerprint": fingerprint(
                    state, preprocessing, output_key, arch if format_version >= 2 else None
                ),
                "score_thres": score_thres,
                "source_weights": source,
                "weights_dtype": "float16" if compact else "float32",
                "onnx_opset": opset,
                "files": {name: file_sha256(staging / name) for name in files},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for path in staging.iterdir():
                path.chmod(FILE_MODE)  # as the umask has them: temporary ones are owner-only
            staging.chmod(FOLDER_MODE)
            replace_folder(staging, place)
        except OSError as exc:  # the ONNX writer's (a full disk, say) names no file
            raise _write_refused(out_dir, exc) from None
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return out_dir


def _write_refused(out_dir: Path, exc: OSError) -> ExportError:
    """The error for a write the system refused, naming the export rather than a file of
    the temporary folder it is written into."""
    return ExportError(f"cannot write the export to {out_dir}: {write_failure_reason(exc)}")


def _may_hold_an_export(folder: Path) -> bool:
    """Whether an export could be written to `folder` as a whole: a new or empty folder,
    or an earlier export, other than the working directory."""
    if folder.resolve() == Path.cwd().resolve():
        return False
    return not folder.is_dir() or not any(folder.iterdir()) or (folder / MANIFEST).is_file()


def check_export_target(out_dir: Path, name: str = "out_dir") -> None:
    """An ExportError where an export cannot go to `out_dir`, saying to choose another
    `name`: what the caller gave the folder as, the parameter from Python, `shitu export`'s
    --out from the command line (it checks before the model is built)."""
    # A file on the way would fail the write with a bare "File exists" / "Not a directory".
    in_the_way = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise ExportError(
            f"{out_dir}: {in_the_way} is a file, not a folder; choose another folder for {name}"
        )
    file_like = out_dir.suffix.lower() in (".onnx", ".json", *WEIGHT_SUFFIXES)
    if file_like and not (out_dir / MANIFEST).is_file():  # `--out model.onnx` made a folder
        # `--out m3/model.onnx`, an export's own file named: the folder meant is m3, where
        # an export may go there (not the working directory, nor a folder of other files)
        meant = (
            out_dir.parent
            if out_dir.name in EXPORT_FILES and _may_hold_an_export(out_dir.parent)
            else out_dir.with_suffix("")
        )
        raise ExportError(
            f"{out_dir}: a file's name, but an export is a folder ({ONNX_FILE}, {TORCH_FILE} "
            f"and {MANIFEST} go into it); give a folder for {name}, e.g. {meant}"
        )
    if not out_dir.exists():
        return
    if out_dir.resolve() == Path.cwd().resolve():
        # Replacing it fails ("Device or resource busy" for `.`) or leaves the shell that
        # ran the command in a deleted folder.
        raise ExportError(
            f"{out_dir} is the current folder, which an export replaces as a whole; give it "
            f"a folder of its own for {name} (e.g. my_model)"
        )
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file()):
        raise ExportError(
            f"{out_dir} exists and is not a shitu export; choose a new folder for {name}"
        )
    # The old export is replaced as a whole folder: anything else in it would go with it.
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise ExportError(
            f"{out_dir} is an export that also holds {first_few(others, 5)}, which replacing it "
            f"would delete; move them out of it or choose a new folder for {name}"
        )


def _check_finite(model: RecModel, source: str | None, why: str) -> None:
    """An ExportError naming the first tensor with NaN or infinite values: every feature of
    such a model is NaN, which the export would write silently and a gallery would refuse
    only as its images are added."""
    bad = non_finite_tensors(model.state_dict())
    if bad:
        where = f"{source}: " if source else ""
        raise ExportError(f"{where}{bad[0]} holds NaN or infinite values {why}")


def _export_onnx(
    model: FeaturesOnly, path: Path, preprocessing: Preprocessing, opset: int, out_dir: Path
) -> None:
    """Trace to ONNX with a dynamic batch axis, then check ONNX == torch on a batch of 2.
    `out_dir`: the export's folder, which a failure names (`path` is in its staging folder,
    gone once the export fails)."""
    import onnxruntime as ort

    width, height = preprocessing.size
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        trace_to_onnx(
            model,
            (example,),
            path,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
        expected = model(example).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {INPUT_NAME: example.numpy()})[0]
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(actual - expected).max()) / scale
    if not diff <= EXPORT_TOLERANCE:  # NaN included
        raise ExportError(
            f"{out_dir}: not written, the ONNX model's output differs from torch's by "
            f"{diff:.2e} of the largest feature (at most {EXPORT_TOLERANCE:g} expected)"
        )
    logger.info("ONNX export %s: max |onnx - torch| = %.2e of the largest feature", out_dir, diff)


def refuse_unregistered_components(arch: ArchConfig, where: Path) -> None:
    """Refuse an arch naming a component no imported module registers, saying to import it:
    an export of a user-registered backbone holds its weights, not its code, so another
    process must import the module that registers it before the torch runtime can build it."""
    registry.populate()
    for component, components in (
        (arch.Backbone, registry.BACKBONES),
        (arch.Neck, registry.NECKS),
        (arch.Head, registry.HEADS),
    ):
        if component is not None and component.name not in components:
            raise CheckpointError(
                f"{where}: the model's {components.kind} '{component.name}' is not registered "
                f"in this process{did_you_mean(component.name, components.names())}: if it is "
                f"your own, import the module that registers it "
                f"(shitu.registry.{components.kind.upper()}S.register) before loading the "
                f"export, which holds its weights, not its code; "
                f"registered {components.kind}s: {', '.join(components.names())}"
            )


def load_exported_model(model_dir: str | Path, manifest: dict[str, Any]) -> RecModel:
    """The export's folded model in eval mode, checked against the fingerprint its manifest
    records (so a hand-edited arch or preprocessing is refused, not silently served)."""
    where = Path(model_dir) / MANIFEST
    try:
        arch = ArchConfig.model_validate(manifest["arch"])
    except ValidationError as exc:  # an arch edited by hand, say
        problem = format_validation_error(exc, ArchConfig, what="arch")
        raise CheckpointError(
            f"{where}: {problem} (edited by hand? export the model again)"
        ) from None
    refuse_unregistered_components(arch, where)
    try:
        model = build_model(arch).eval()
    except ConfigError as exc:
        raise CheckpointError(
            f"{where}: arch: {exc} (edited by hand? export the model again)"
        ) from None
    load_weights(model, Path(model_dir) / TORCH_FILE, strict=True)  # folds, as the file says
    check_fingerprint(model_dir, manifest, model.state_dict())
    return model
