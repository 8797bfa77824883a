"""Weight averaging ("model soup", Wortsman et al., ICML 2022) of runs from one initialisation.

Runs fine-tuned from the same pretrained weights with different schedules or losses
usually land in one basin of the loss, so their element-wise mean is a single model
that is often better than each of them, at no extra inference cost. The same holds
between a fine-tuned model and its pretrained start (WiSE-FT, Wortsman et al., CVPR
2022): moving the pretrained layers part of the way back keeps more of what pretraining
knew about other domains, often at little cost on the fine-tuning data.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from pathlib import Path

import torch

from shitu.checkpoint.io import (
    ARCH,
    REPARAMETERIZED,
    read_weights,
    setting_differences,
    weight_shaping_arch,
)
from shitu.errors import CheckpointError, did_you_mean, first_few
from shitu.values import is_number

logger = logging.getLogger(__name__)

# Metadata that must agree: averaging different architectures or a folded with an
# unfolded model would give a file that loads but computes nonsense.
MUST_MATCH = (ARCH, REPARAMETERIZED)


def _compared(metadata: dict[str, str], key: str) -> object:
    """`metadata[key]`; for the ARCH config, only what shapes the weights (soups mix runs
    that differ in which layers were frozen, where their starting weights came from or a
    margin head's margin)."""
    if key != ARCH or key not in metadata:
        return metadata.get(key)
    try:
        arch = json.loads(metadata[key])
    except ValueError:
        return metadata[key]
    return weight_shaping_arch(arch) if isinstance(arch, dict) else arch


def average_weights(
    paths: list[str | Path],
    weighting: list[float] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Element-wise mean of the floating-point tensors of several weight files.

    `weighting` gives each file a relative weight (default: equal), so that a soup of
    three runs, weighted 3, and a fourth run, weighted 1, give the four-run soup without
    the first three runs' files. Each mean has the widest floating dtype the files give its
    tensor (a float16 export does not round a soup with float32 runs, whatever the order);
    integer tensors (e.g. batch-norm step counters) are taken from the first file. The files
    must hold the same tensor names and shapes and the same architecture metadata. Returns
    the averaged state dict and the first file's metadata.
    """
    if len(paths) < 2:
        raise CheckpointError(f"averaging needs at least two weight files, got {len(paths)}")
    weighting = [1.0] * len(paths) if weighting is None else list(weighting)
    if not all(is_number(weight) for weight in weighting):  # float("x"): Python's words
        raise CheckpointError(f"weighting {weighting}: each value must be a number")
    weighting = [float(weight) for weight in weighting]
    if len(weighting) != len(paths):
        # named as the option is: "1 weights given" was taken for weight files
        values = f"{len(weighting)} value{'' if len(weighting) == 1 else 's'}"
        raise CheckpointError(
            f"weighting {weighting}: {values} for {len(paths)} weight files; give one per file"
        )
    if not all(math.isfinite(weight) and weight > 0 for weight in weighting):  # inf: NaN soup
        raise CheckpointError(f"weighting {weighting}: each value must be positive and finite")
    _warn_of_repeated_files(paths)
    largest = max(weighting)  # relative to it: a sum of huge weights is inf (a NaN soup)
    weighting = [weight / largest for weight in weighting]
    total = sum(weighting)
    first_path = paths[0]
    first, metadata = read_weights(first_path)
    sums = {
        name: tensor.double() * weighting[0]
        for name, tensor in first.items()
        if tensor.is_floating_point()
    }
    dtypes = {name: first[name].dtype for name in sums}
    for path, weight in zip(paths[1:], weighting[1:], strict=True):
        state, other_metadata = read_weights(path)
        for key in MUST_MATCH:
            if _compared(metadata, key) == _compared(other_metadata, key):
                continue
            if (key in metadata) != (key in other_metadata):  # e.g. a plain torch.save
                bare, other = (first_path, path) if key in other_metadata else (path, first_path)
                raise CheckpointError(
                    f"{bare} has no {key} metadata, {other} has: cannot tell whether they "
                    f"hold the same model (`shitu convert {bare} -c CONFIG` records it)"
                )
            differences = setting_differences(
                _compared(metadata, key),
                _compared(other_metadata, key),
                key,
                f"{Path(first_path).name}'s",
            )
            raise CheckpointError(
                f"{path}: its {key} differs from {first_path}'s: {'; '.join(differences[:3])}; "
                "only weights of the same model can be averaged"
                + _headless_hint(metadata, other_metadata, first_path, path)
            )
        if state.keys() != first.keys():
            extra = sorted(state.keys() - first.keys())[:3]
            lacking = sorted(first.keys() - state.keys())[:3]
            raise CheckpointError(
                f"{path}: tensor names differ from {first_path}'s "
                f"(only here: {extra or 'none'}; only there: {lacking or 'none'})"
            )
        for name, tensor in state.items():
            if tensor.shape != first[name].shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, "
                    f"{first_path} has {tuple(first[name].shape)}"
                )
            if name in sums:
                sums[name] += tensor.double() * weight
                dtypes[name] = torch.promote_types(dtypes[name], tensor.dtype)
    averaged = {
        name: (sums[name] / total).to(dtypes[name]) if name in sums else tensor
        for name, tensor in first.items()
    }
    return averaged, metadata


def _headless_hint(
    first: dict[str, str], other: dict[str, str], first_path: str | Path, path: str | Path
) -> str:
    """How to average weights whose archs differ only in their classification head: an
    export's (no head) with a training run's, or runs trained on different classes
    (`Head.class_num`). The difference alone ("Head {...} (model.safetensors's None)") did
    not say that leaving the head out, which features do not use, is the cure."""
    archs = [_compared(metadata, ARCH) for metadata in (first, other)]
    if not all(isinstance(arch, dict) for arch in archs):
        return ""
    heads = [arch.get("Head") for arch in archs]
    bodies = [{name: v for name, v in arch.items() if name != "Head"} for arch in archs]
    if bodies[0] != bodies[1] or heads[0] == heads[1]:
        return ""
    if None not in heads:
        return (
            f" (the same model but for the classification head: `shitu convert {first_path} "
            f"-c CONFIG --no-head --out FILE`, and the same for {path}, leave it out)"
        )
    headed = path if heads[0] is None else first_path
    return (
        f" (the same model, but {headed} has a classification head and the other none: "
        f"`shitu convert {headed} -c CONFIG --no-head --out FILE` leaves it out)"
    )


def _warn_of_repeated_files(paths: list[str | Path]) -> None:
    """Warn of a file given more than once (a pasted path, or a glob and a name that match
    the same run): it counts once per mention, so the soup leans to that run, unsaid."""
    seen: dict[Path, str | Path] = {}
    for path in paths:
        first = seen.setdefault(Path(path).resolve(), path)
        if first is not path:
            logger.warning(
                "%s is given more than once (as %s too): it counts once per mention, as a "
                "larger --weighting would",
                path,
                first,
            )


def check_share(share: float) -> None:
    """A share of the way back to the reference weights: strictly between 0 and 1."""
    if not is_number(share) or not 0.0 < share < 1.0:
        raise CheckpointError(f"--pretrained-share {share!r}: must be between 0 and 1 (exclusive)")


def interpolate_toward(
    state: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    share: float,
    prefixes: list[str],
    hint: str = "(does the config build the same model?)",
    pretrained: Collection[str] | None = None,
    reference_name: str = "the reference",
) -> dict[str, torch.Tensor]:
    """`state` with each floating-point tensor under `prefixes` (module paths such as
    `backbone.blocks`) replaced by (1 - share) * itself + share * its `reference` tensor,
    e.g. the pretrained initialisation; every other tensor is kept as it is. `hint` ends
    the error for a tensor the reference lacks or has in another shape (`fit_hint`'s).
    `pretrained`: the reference tensors that hold pretrained values (None: all); one under
    `prefixes` outside them is refused, as its reference is a random initialisation (a new
    embedding layer in `backbone`, say), different on every run. `reference_name`: what the
    error calls `reference`, in the caller's terms ("the model the config builds")."""
    check_share(share)
    parts = [name.split(".") for name in state]
    modules = sorted({".".join(path[:end]) for path in parts for end in range(1, len(path))})
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in state):
            raise CheckpointError(
                f"--layers {prefix}: no tensor of the weights is under it"
                f"{did_you_mean(prefix, modules)}"
            )
    mixed, random_start = {}, []
    for name, tensor in state.items():
        if tensor.is_floating_point() and any(_under(name, prefix) for prefix in prefixes):
            other = reference.get(name)
            if other is None or other.shape != tensor.shape:
                found = "missing" if other is None else f"shape {tuple(other.shape)}"
                raise CheckpointError(
                    f"{name}: {tuple(tensor.shape)} in the weights, {found} in {reference_name} "
                    f"{hint}"
                )
            if pretrained is not None and name not in pretrained:
                random_start.append(name)
            tensor = ((1 - share) * tensor.double() + share * other.double()).to(tensor.dtype)
        mixed[name] = tensor
    if random_start:
        raise CheckpointError(_not_pretrained(random_start, prefixes, reference, pretrained or ()))
    return mixed


def _not_pretrained(
    names: list[str], prefixes: list[str], state: Collection[str], pretrained: Collection[str]
) -> str:
    """Why the layers holding `names` cannot be mixed, and the layers to name instead: each
    prefix none of whose tensors is among `names`, else its modules one level down whose
    tensors the pretrained weights all gave (in the order of `state`, the model's)."""
    instead: list[str] = []
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            instead.append(prefix)
            continue
        depth = prefix.count(".") + 2  # segments of a module one level below the prefix
        for name in state:
            module = ".".join(name.split(".")[:depth])
            if (
                _under(name, prefix)
                and name.count(".") >= depth
                and name in pretrained
                and module not in instead
                and not any(_under(other, module) for other in names)
            ):
                instead.append(module)
    advice = f"; give --layers {' '.join(instead)}" if instead else ""
    return (
        f"--layers {' '.join(prefixes)}: {first_few(names, 3)} did not come from the config's "
        "pretrained weights (the model initialises them afresh, weights at random), so there is no "
        f"pretrained value to move them back to{advice}"
    )


def _under(name: str, prefix: str) -> bool:
    """Whether tensor or module `name` lies under the module path `prefix` (or is it)."""
    return name == prefix or name.startswith(prefix + ".")
