"""Reading and writing model weights: safetensors (default), torch, and PaddleClas .pdparams."""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic_core import to_jsonable_python
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from shitu.checkpoint.paddle import paddle_to_torch, read_pdparams, refuse_unmapped
from shitu.config.schema import TRAINING_ONLY_ARCH
from shitu.engine.state import training_state_kind
from shitu.errors import CheckpointError, ConfigError, first_few
from shitu.fileio import (
    from_working_directory,
    refuse_non_utf8_path,
    refuse_url,
    torch_save_atomically,
    write_atomically,
    write_failure_reason,
)
from shitu.models.reparam import is_reparameterized, reparameterize
from shitu.registry import BACKBONES, HEADS, NECKS, Registry, populate

# Compared with a name's suffix lower-case, as image suffixes are (MODEL.PTH, a Windows tool's).
TORCH_SUFFIXES = (".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".pdparams")
REPARAMETERIZED = "shitu.reparameterized"
ARCH = "shitu.arch"  # the Arch config that built the weights, as JSON
# The "format" entry of shitu.detection's checkpoints starts with this (defined here, below
# it, so that recognition loading can refuse them without importing detection).
DETECTOR_FORMAT_PREFIX = "shitu-picodet"
# Where the tensors of a PaddleDetection PicoDet's head are named, in its .pdparams (of the
# PicoHead and PicoHeadV2 alike): such a file holds a detector, which no recogniser is.
PADDLE_PICODET_HEAD = "head.conv_feat."

logger = logging.getLogger(__name__)
# The hint where a file that does not fit tells no more about why.
CHECK_THE_CONFIG = "(does the config match?)"


@dataclass
class LoadReport:
    """What happened to each tensor when weights were loaded."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every model tensor came from the file and every file tensor found its place."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        """One line: tensors loaded, and the first few missing, unexpected or misshapen."""
        return "; ".join([f"loaded {len(self.loaded)} tensors", *self.misfits()])

    def misfits(self) -> list[str]:
        """Each kind of tensor that did not fit (missing, unexpected, misshapen): how many,
        and the first few."""
        found = []
        for label, names in (
            ("missing from file", self.missing),
            ("not in model", self.unexpected),
            ("shape mismatch", self.shape_mismatch),
        ):
            if names:
                # A batch norm's counter says less than its weights: safetensors files
                # list them first (int64 before float), as every example there was.
                shown = sorted(names, key=lambda name: name.endswith("num_batches_tracked"))
                found.append(f"{len(names)} {label} ({first_few(shown, 3)})")
        return found


def check_weights_name(path: str | Path) -> Path:
    """`path` if `save_weights` can write that kind of file; commands check their output
    name with it first, before the minutes of work whose result it names."""
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", *TORCH_SUFFIXES):
        raise CheckpointError(f"cannot write {path}: use a .safetensors, .pt or .pth file name")
    return path


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of `state`'s floating-point tensors holding NaN or infinite values: every
    feature of such a model is NaN."""
    return [
        name
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """A CheckpointError naming the first few of `state`'s tensors with NaN or infinite
    values, before they are written: `shitu convert` and `shitu average` wrote them without
    a word, and only `shitu export` refused them, later."""
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{what}: {first_few(bad, 3)} hold{'s' if len(bad) == 1 else ''} NaN or infinite "
            "values (weights of a training run that diverged?); nothing written"
        )


def save_weights(
    state: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    durable: bool = False,
) -> Path:
    """Write a state dict atomically (.safetensors, or torch for .pt/.pth); `durable` also
    syncs it to disk (see `shitu.fileio.write_atomically`)."""
    path = check_weights_name(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = dict(metadata or {})

    if path.suffix.lower() != ".safetensors":
        return torch_save_atomically({"state_dict": tensors, "metadata": metadata}, path, durable)
    try:
        return write_atomically(
            path, lambda tmp: save_file(tensors, tmp, metadata=metadata), durable
        )
    # A folder of that name, a file in the way of its folder, no space (which safetensors
    # reports as its own error).
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot write {path}: {write_failure_reason(exc)}") from None


def weights_file(path: str | Path) -> Path:
    """`path`, or, where no file has that name, the weight file of that name plus a suffix
    (the first of `WEIGHT_SUFFIXES` found): PaddleClas's `Global.pretrained_model` names
    files without their suffix (`output/RecModel/best_model`). A URL, as PaddleClas (which
    downloads it) takes, is refused naming it: as a path it was "not found: https:/..."."""
    refuse_url(path, "weights", CheckpointError)
    path = Path(path)
    if path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES:
        return path
    suffixed = (path.with_name(path.name + suffix) for suffix in WEIGHT_SUFFIXES)
    return next((candidate for candidate in suffixed if candidate.is_file()), path)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and metadata from a .safetensors or torch file written by `save_weights`.

    Plain torch state dicts (and dicts with a 'state_dict' or 'model' entry) are accepted too.
    """
    path = weights_file(path)
    if not path.is_file():
        raise CheckpointError(_no_weight_file(path))
    if path.suffix.lower() == ".pdparams":  # its names and layouts depend on the model it goes into
        raise CheckpointError(
            f"{path}: .pdparams need a model to be read; `shitu convert` it first"
        )
    if path.suffix.lower() == ".safetensors":
        # else "not a readable safetensors file", of a file that is fine
        refuse_non_utf8_path(path, "the weight file's path", "safetensors", CheckpointError)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            return _unwrapped(load_file(str(path))), metadata
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    if path.suffix.lower() in TORCH_SUFFIXES:
        try:
            with warnings.catch_warnings():
                # of a pickle torch.save did not write (pickle.dump's), a Python warning with
                # torch's source line, before the line that names the file
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt files
            raise CheckpointError(_torch_load_failure(path, exc)) from None
        metadata = {}
        if isinstance(data, dict) and str(data.get("format", "")).startswith(
            DETECTOR_FORMAT_PREFIX
        ):
            raise CheckpointError(
                f"{path} is a PicoDet detector checkpoint, not the weights of a recognition "
                "model (`shitu detect --model` takes it)"
            )
        if training_state_kind(data) == "detector":
            raise CheckpointError(
                f"{path} is a detector training checkpoint (for `shitu detect-train --resume`), "
                "not the weights of a recognition model"
            )
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            metadata = _text_entries(data.get("metadata"))
            data = data["state_dict"]
        elif isinstance(data, dict) and isinstance(data.get("model"), dict):
            metadata = _training_state_metadata(data)
            if "ema" in data:
                logger.warning(
                    "%s: the weights of the run's last step, not the moving average of "
                    "its EMA section that the run evaluated and saved (its best_model and "
                    "final_model .safetensors hold that)",
                    path,
                )
            data = data["model"]
        if not isinstance(data, dict) or not all(
            isinstance(v, torch.Tensor) for v in data.values()
        ):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        return _unwrapped(data), metadata
    raise CheckpointError(
        f"unsupported weight file {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}"
        f"{_weights_beside(path)}"
    )


def _weights_beside(path: Path) -> str:
    """Where the weights are of a file that holds none: the .pdparams beside what PaddleClas
    saves with it (optimizer, training or EMA state), the torch weights of the export
    whose ONNX model (or manifest) was given, as `shitu export`'s `model.onnx` often is, or
    the .pdparams a Paddle inference model (PP-ShiTuV2's download) was exported from."""
    from shitu.inference.manifest import (
        MANIFEST,
        PADDLE_INFERENCE_SUFFIXES,
        PADDLE_INFERENCE_UNREAD,
        weight_file_in,
    )

    if path.suffix.lower() in PADDLE_INFERENCE_SUFFIXES:
        return f" (a file of a Paddle inference model, {PADDLE_INFERENCE_UNREAD})"
    weights = path.with_suffix(".pdparams")
    if weights.is_file():
        return f" ({weights} holds the weights)"
    if (path.parent / MANIFEST).is_file():
        return f" ({path.parent} is {weight_file_in(path.parent)})"
    return ""


def _text_entries(metadata: object) -> dict[str, str]:
    """The text entries of a torch file's `metadata` (all of those `save_weights` writes):
    another tool's file may hold numbers or anything else there, which a .safetensors file
    written from it (a soup of it) cannot hold."""
    if not isinstance(metadata, dict):
        return {}
    return {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}


def _no_weight_file(path: Path) -> str:
    """Why `path` gives no weights: a folder (what it is, and the file in it to give), or
    nothing there (and, in a training run's folder, the weights it has: a run that never
    evaluated has no best_model, which commands are often given)."""
    # Lazily: the names of what each folder holds are the inference package's.
    from shitu.inference.manifest import (
        PADDLE_TRAINING_WEIGHTS,
        TRAINING_RUN_WEIGHTS,
        weight_file_in,
    )

    if path.is_dir():
        return f"{path} is {weight_file_in(path)}"
    # A name without a suffix was looked for with each one too (`weights_file`).
    suffixes = ", ".join(WEIGHT_SUFFIXES)
    tried = "" if path.suffix.lower() in WEIGHT_SUFFIXES else f" (nor with {suffixes})"
    run = path.parent
    in_run = any((run / name).is_file() for name in TRAINING_RUN_WEIGHTS + PADDLE_TRAINING_WEIGHTS)
    beside = f"; {run} is {weight_file_in(run)}" if in_run else ""
    return f"weight file not found: {path}{tried}{beside}{from_working_directory(path)}"


# What torch's DataParallel and DistributedDataParallel put before each name of the model
# they wrap: a state dict saved from the wrapper has it on every tensor.
_WRAPPER_PREFIX = "module."


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the wrapper's `module.` taken off its names where every name has it: a
    torch file saved from a DDP-wrapped model (by another trainer) names no tensor of the
    model otherwise."""
    if not state or not all(name.startswith(_WRAPPER_PREFIX) for name in state):
        return state
    return {name[len(_WRAPPER_PREFIX) :]: tensor for name, tensor in state.items()}


def _torch_load_failure(path: Path, error: Exception) -> str:
    """Why torch.load, tensors only, could not read `path`. Of a file that pickles Python
    objects (a whole model, `torch.save(model, ...)`), torch's message runs to pages with
    terminal colours and advises loading it as code, which shitu never does: say which
    object it holds and what to save instead."""
    if path.stat().st_size == 0:  # torch's EOFError says nothing
        return f"{path} is empty (0 bytes), not a torch checkpoint (a save that never finished?)"
    if _reads_as_pdparams(path):
        return (
            f"{path} is no torch checkpoint but a pickle of numpy arrays, as PaddlePaddle's "
            f".pdparams are: name it {path.with_suffix('.pdparams').name}"
        )
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found is None:
        if isinstance(error, EOFError | KeyError):  # an unpickler's, naming no problem ("101")
            return (
                f"{path} is not a readable torch checkpoint: cut short, or not a torch file "
                "(neither a torch.save zip archive nor a legacy pickle)"
            )
        # Of a pickle that torch.save did not write (pickle.dump's protocol 4, "Unsupported
        # operand 149"): torch's own words advise loading it as code, which shitu never does.
        refused = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(error), re.S)
        if refused is not None:
            return (
                f"{path} is not a readable torch checkpoint: a pickle torch.save did not "
                f"write ({refused.group(1)}); save the weights with "
                "torch.save(model.state_dict(), PATH)"
            )
        return f"{path} is not a readable torch checkpoint: {error}"
    return (
        f"{path} holds pickled Python objects ({found.group(1)}), not only tensors, and shitu "
        "never runs a file's code to read it; save the weights alone: "
        "torch.save(model.state_dict(), PATH)"
    )


def _reads_as_pdparams(path: Path) -> bool:
    """Whether `path`, which torch cannot read, reads as a .pdparams (numpy arrays only)."""
    try:
        read_pdparams(path)
    except CheckpointError:
        return False
    return True


# Settings of the margin heads (ArcMargin, CosMargin, CircleMargin) that shape only their
# training logits: out of training they give plain cosines to the class weights, so runs
# of a margin or scale sweep hold weights of one model.
_TRAINING_LOGIT_HEAD_SETTINGS = ("margin", "scale", "easy_margin")


def weight_shaping_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """An Arch config (as JSON data) without its training-only settings (frozen layers, a
    margin head's margin and scale), without where the backbone's starting weights came
    from (soups mix runs that differ only there) and without component settings written
    out at their defaults (`bias_frozen: true` builds BNNeck as leaving it out does), null or
    at a preset's fixed value (`settings_as_built`)."""
    shaping = {name: value for name, value in arch.items() if name not in TRAINING_ONLY_ARCH}
    for section, left_out in (
        ("Backbone", ("pretrained",)),
        ("Neck", ()),
        ("Head", _TRAINING_LOGIT_HEAD_SETTINGS),
    ):
        if isinstance(shaping.get(section), dict):
            settings = settings_as_built(shaping[section], _COMPONENT_REGISTRIES[section])
            shaping[section] = {name: v for name, v in settings.items() if name not in left_out}
    return shaping


_COMPONENT_REGISTRIES = {"Backbone": BACKBONES, "Neck": NECKS, "Head": HEADS}


def without_defaults(settings: dict[str, Any], components: Registry) -> dict[str, Any]:
    """A component's section without the settings equal to its constructor's defaults, as
    a section that leaves them out builds it; as given where its name is not a registered
    component (a file of another version)."""
    populate()
    name = settings.get("name")
    if not isinstance(name, str) or name not in components:
        return settings
    fields = components.params_model(name).model_fields
    return {
        key: value
        for key, value in settings.items()
        if key not in fields or fields[key].is_required() or fields[key].default != value
    }


def settings_as_built(settings: dict[str, Any], components: Registry) -> dict[str, Any]:
    """A component's section (JSON data) without the settings that build what leaving them
    out builds: at the default, null (which takes it) or at the value a preset fixes
    (`depths` of a PP-LCNetV2 preset), compared as the component reads them. The others
    are kept as written, except text that a switch or number reads (`yes`, `010`, which
    YAML 1.2 leaves text): as read, so that `last_act: yes` records what `last_act: true`
    does. As given where the component is not registered (a file of another version),
    as its defaults are unknown; where its settings do not validate, `without_defaults`."""
    populate()
    name = settings.get("name")
    if not isinstance(name, str) or name not in components:
        return settings
    given = {key: value for key, value in settings.items() if key != "name"}
    try:
        validated = components.validate(name, given)  # typed; a preset's fixed values left out
    except ConfigError:
        return without_defaults(settings, components)
    fields = components.params_model(name).model_fields
    return {
        "name": name,
        **{
            key: value if value == validated[key] else to_jsonable_python(validated[key])
            for key, value in given.items()
            if key in validated
            and (
                key not in fields
                or fields[key].is_required()
                or validated[key] != fields[key].default
            )
        },
    }


def _training_state_metadata(payload: dict) -> dict[str, str]:
    """What `model_metadata` records, recovered from a training checkpoint's config, so
    `latest.pt` averages with the run's .safetensors files (training never folds)."""
    try:
        arch = json.loads(payload["config"])["Arch"]
    except (KeyError, TypeError, ValueError):
        return {}
    return {REPARAMETERIZED: "false", ARCH: json.dumps(arch)}


class _NotSet:
    """A setting that one side does not hold: compared as null, shown as "at its default"
    (the constructor's, which a left-out setting takes: "not set" read as unset)."""

    def __repr__(self) -> str:
        return "at its default"


_NOT_SET = _NotSet()


def setting_differences(first: object, other: object, where: str, than: str) -> list[str]:
    """Where two versions of settings (config sections, or an Arch recorded as metadata, as
    JSON data) differ, by setting, as 'KEY OTHER (THAN FIRST)', nested keys joined by dots:
    `Arch.Head.class_num 7 (was 6)` for a resumed run's config against its checkpoint's
    (`than` "was"). A tensor's size mismatch does not name the setting that changed it. A
    key one side lacks is "at its default" there (a config leaves it out, or a recorded
    Arch drops settings written out at their defaults), and equal to null."""
    if isinstance(first, dict) and isinstance(other, dict):
        keys = sorted(first.keys() | other.keys(), key=str)
        prefix = f"{where} " if where == ARCH else f"{where}."
        return [
            difference
            for key in keys
            for difference in setting_differences(
                first.get(key, _NOT_SET), other.get(key, _NOT_SET), f"{prefix}{key}", than
            )
        ]
    same = (None if first is _NOT_SET else first) == (None if other is _NOT_SET else other)
    return [] if same else [f"{where} {other!r} ({than} {first!r})"]


def state_for_model(
    model: nn.Module, path: str | Path
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Tensors of any supported file, named and laid out for `model`, the names left out,
    and the file's metadata (none for .pdparams).

    Folds `model` first when the file holds re-parameterised (folded) weights.
    """
    path = weights_file(path)
    if path.suffix.lower() == ".pdparams":
        if not path.is_file():  # a folder, or a name mistyped beside the right file
            raise CheckpointError(_no_weight_file(path))
        refuse_unmapped(model, path)
        paddle_state = read_pdparams(path)
        if any(name.startswith(PADDLE_PICODET_HEAD) for name in paddle_state):
            raise CheckpointError(
                f"{path} holds a PaddleDetection PicoDet detector, not the weights of a "
                "recognition model (`shitu detect --model` takes it, with --arch)"
            )
        return (*paddle_to_torch(paddle_state, model), {})
    state, metadata = read_weights(path)
    if metadata.get(REPARAMETERIZED) == "true":
        reparameterize(model)
    return state, [], metadata


def fit_hint(metadata: dict[str, str], arch: dict[str, Any] | None) -> str:
    """What to add where a file does not fit the model built from `arch` (the Arch config
    as JSON data, only its sections compared): the settings that differ from those the
    file records it was built with, where it records them, else to check the config."""
    check = CHECK_THE_CONFIG
    if arch is None or ARCH not in metadata:
        return check
    try:
        recorded = json.loads(metadata[ARCH])
    except ValueError:
        return check
    if not isinstance(recorded, dict):
        return check
    given, built = weight_shaping_arch(arch), weight_shaping_arch(recorded)
    differences = setting_differences({k: built.get(k) for k in given}, given, "Arch", "the file's")
    if not differences:
        return check
    # Another component (Arch.Backbone.name) first: the settings beside it, shown before it
    # in key order, are its consequences, and the first three may be all of them.
    differences.sort(key=lambda difference: not difference.split(" ")[0].endswith(".name"))
    return f"(the config's Arch settings differ from the file's: {'; '.join(differences[:3])})"


def load_weights(
    model: nn.Module,
    path: str | Path,
    strict: bool = True,
    ignore_prefixes: tuple[str, ...] = (),
    arch: dict[str, Any] | None = None,
) -> LoadReport:
    """Load weights into `model`.

    strict: every tensor must be present with the right shape (else CheckpointError).
    Not strict: load what fits, report the rest.
    ignore_prefixes: file tensors to leave out on purpose (e.g. 'head.' for a feature extractor).
    arch: the Arch config (JSON data) `model` was built from, its sections to compare with
    those the file records, so that a file that does not fit names the settings that differ
    (a training run's `-o Arch...` left out of the command that loads its weights).
    """
    state, dropped, metadata = state_for_model(model, path)
    if ignore_prefixes:
        dropped += [k for k in state if k.startswith(ignore_prefixes)]
        state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    hint = fit_hint(metadata, arch)
    return _fit(model, state, dropped, strict, source=str(path), hint=hint)


def load_pretrained(module: nn.Module, path: str | Path | bool) -> LoadReport:
    """Initialise `module` (e.g. a backbone) from a weight file, loading only what fits.

    Accepts files of the module itself, or of a whole RecModel (its `backbone.`
    entries are used). Tensors that do not fit (a different classifier size, say)
    are skipped and logged.
    """
    if path is True or path is False:
        raise CheckpointError(
            "True would download weights, which shitu never does; "
            "give the path of a .safetensors, .pt/.pth or .pdparams file"
        )
    state, dropped, _ = state_for_model(module, path)
    own = module.state_dict()
    if not any(name in own for name in state):
        prefix = "backbone."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    report = _fit(module, state, dropped, strict=False, source=str(path))
    if not report.loaded:
        raise CheckpointError(f"{path}: no tensor fits {type(module).__name__}; {report.summary()}")
    counted = [name for name in module.state_dict() if not name.endswith("num_batches_tracked")]
    fitted = len(set(report.loaded) & set(counted))
    if fitted < len(counted) / 2:  # most of the module would train from random weights
        logger.warning(
            "pretrained %s: only %d of %s's %d tensors fit (a file of another architecture "
            "or naming?): %s",
            path,
            fitted,
            type(module).__name__,
            len(counted),
            report.summary(),
        )
    else:
        logger.info("pretrained %s: %s", path, report.summary())
    return report


def fitting_tensors(
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    dropped: list[str] | None = None,
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """What of `state` fits a module whose `state_dict()` is `expected`: the report, and the
    tensors that fit, in the module's dtypes (with the batch counters Paddle's files lack
    at 0). `dropped`: the file's tensors left out before, for the report."""
    report = LoadReport(dropped=list(dropped or []))
    fitting: dict[str, torch.Tensor] = {}
    mismatched: set[str] = set()
    for name, tensor in state.items():
        if name not in expected:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            mismatched.add(name)
            report.shape_mismatch.append(
                f"{name} {tuple(tensor.shape)} vs {tuple(expected[name].shape)}"
            )
        else:
            fitting[name] = tensor.to(expected[name].dtype)
    for name, value in expected.items():
        if name not in state and name.endswith("num_batches_tracked"):
            fitting[name] = torch.zeros_like(value)  # Paddle does not count batches
    report.missing = [n for n in expected if n not in fitting and n not in mismatched]
    report.loaded = sorted(name for name in fitting if name in state)  # not the added counters
    return report, fitting


def _fit(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    dropped: list[str],
    strict: bool,
    source: str,
    hint: str = CHECK_THE_CONFIG,
) -> LoadReport:
    expected = model.state_dict()
    report, fitting = fitting_tensors(expected, state, dropped)
    mismatched = {name for name in state if name in expected and name not in fitting}
    if strict and not report.complete:
        if _only_the_head_missing(report, state):
            hint = (
                "(the file holds no classification head, as an export's weights do: leave "
                "the head out, with --no-head or -o Arch.Head=null)"
            )
        elif hint == CHECK_THE_CONFIG and (
            classes := _only_the_class_count_differs(report, state, expected, mismatched)
        ):  # a file that records its Arch settings names the one that differs
            hint = (
                f"(only the classifier differs: the file's scores {classes} classes; "
                "features need none, so leave the head out with --no-head or "
                f"-o Arch.Head=null, or build it as the file's, -o Arch.Head.class_num={classes})"
            )
        elif _a_backbone_alone(report, expected):
            hint = (
                "(the file holds a backbone alone, its tensors named without 'backbone.', as "
                "ImageNet weights such as PaddleClas's PPLCNetV2_base_pretrained are: a "
                "backbone's starting weights, which training takes as "
                f"-o Arch.Backbone.pretrained={source})"
            )
        raise CheckpointError(f"{source} does not fit the model: {report.summary()} {hint}")
    model.load_state_dict(fitting, strict=False)
    return report


def _only_the_head_missing(report: LoadReport, state: dict[str, torch.Tensor]) -> bool:
    """Whether a file fits but for the classifier it lacks: the weights of an export (or
    of `shitu convert --no-head`) loaded into a model built with the config's Head."""
    return (
        bool(report.missing)
        and all(name.startswith("head.") for name in report.missing)
        and not report.unexpected
        and not report.shape_mismatch
        and not any(name.startswith("head.") for name in state)
    )


def _only_the_class_count_differs(
    report: LoadReport,
    state: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    mismatched: set[str],
) -> int | None:
    """The file's class count where its tensors fit but for the head's class count (a
    PaddleClas run's on its own classes, converted with the recipe's 192,612), else None:
    each misshapen tensor is the head's, and differs in its first size (classes) alone."""
    if report.missing or report.unexpected or not mismatched:
        return None
    if not all(
        name.startswith("head.") and state[name].shape[1:] == expected[name].shape[1:]
        for name in mismatched
    ):
        return None
    counts = {state[name].shape[0] for name in mismatched}
    return counts.pop() if len(counts) == 1 else None


def _a_backbone_alone(report: LoadReport, expected: dict[str, torch.Tensor]) -> bool:
    """Whether most tensors the model did not know are its backbone's, named without
    `backbone.`: a classification network's weights, which initialise a backbone
    (`Arch.Backbone.pretrained`), given for a whole recognition model."""
    backbone_names = [name for name in report.unexpected if f"backbone.{name}" in expected]
    return not report.loaded and len(backbone_names) > len(report.unexpected) / 2


def model_metadata(model: nn.Module, arch: dict | None = None) -> dict[str, str]:
    """Metadata stored beside the weights: whether folded, and the Arch config that built them."""
    metadata = {REPARAMETERIZED: "true" if is_reparameterized(model) else "false"}
    if arch is not None:
        metadata[ARCH] = json.dumps(arch)
    return metadata
