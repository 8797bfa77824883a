"""Read PaddlePaddle `.pdparams` files and map them onto our modules, without Paddle.

A `.pdparams` file is a pickled dict of parameter name -> numpy array. It is
unpickled with an allow-list (numpy arrays and dicts only), so a malicious file
cannot run code. Paddle 1.x's `save_dygraph` pickled with protocol 2 (as does
`paddle.save(..., protocol=2)`), which stores each array's bytes as a
`_codecs.encode(text, "latin1")` call: allowed too (it turns text into bytes, nothing more;
torch's weights-only loader allows it for the same reason).
Mapping rules, from how Paddle names and lays out tensors:
- BatchNorm running statistics are `_mean` / `_variance` (torch: running_mean / running_var);
- Linear weights are [in, out] (torch: [out, in]), as are the class weights of margin heads;
- a re-parameterisable block that has not been folded also stores an unused fused conv,
  and one without branches an unused activation (a PReLU's weight);
- a PReLU's weight is `_weight`;
- bfloat16 tensors (of a bf16 AMP O2 run) are stored as their uint16 bit patterns, read
  here as float32.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shitu.errors import CheckpointError
from shitu.fileio import from_working_directory

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in a protocol-2 pickle (older Paddle's .pdparams)
}
_STRUCTURE_KEY = "StructuredToParameterName@@"


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """Parameter name -> numpy array from a `.pdparams` file (bfloat16 ones as float32)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = _ArrayUnpickler(handle).load()
    except FileNotFoundError:
        raise CheckpointError(
            f"weight file not found: {path}{from_working_directory(path)}"
        ) from None
    except OSError as exc:  # a folder, no permission, ...
        raise CheckpointError(f"cannot read weight file {path}: {exc.strerror or exc}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        OverflowError,  # a corrupt length field: a frame or array larger than memory
        MemoryError,
    ) as exc:
        reason = str(exc) or "a corrupt length field"
        raise CheckpointError(f"{path} is not a readable .pdparams file: {reason}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a .pdparams state dict (found {type(data).__name__})")
    state = {k: v for k, v in data.items() if k != _STRUCTURE_KEY}
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: entry '{bad[0]}' is not an array")
    # else a TypeError of torch's from deep inside the mapping, naming neither file nor entry
    odd = [k for k, v in state.items() if v.dtype.kind not in "biuf"]
    if odd:
        kind = state[odd[0]].dtype
        raise CheckpointError(f"{path}: entry '{odd[0]}' is an array of {kind}, not of numbers")
    return {name: _bfloat16_as_float32(array) for name, array in state.items()}


def refuse_unmapped(model: nn.Module, path: Path) -> None:
    """A CheckpointError where a module of `model` takes no `.pdparams` (its
    `paddle_weights_unmapped` says why): the few tensors of another naming that would fit
    by chance (a classifier) are no weights of it."""
    for module in model.modules():
        reason = getattr(module, "paddle_weights_unmapped", None)
        if reason:
            raise CheckpointError(f"{path}: {reason}")


def _bfloat16_as_float32(array: np.ndarray) -> np.ndarray:
    """`array`, or the float32 values of a bfloat16 one. Paddle saves bfloat16, which numpy
    lacks, as its uint16 bit patterns (its only use of uint16): read as numbers they became
    weights in the tens of thousands, loaded without a word. float32 holds each exactly."""
    if array.dtype.kind != "u" or array.dtype.itemsize != 2:  # any byte order
        return array
    return (array.astype(np.uint32) << 16).view(np.float32)


def _torch_name(paddle_name: str) -> str:
    if paddle_name.endswith("._mean"):
        return paddle_name[: -len("_mean")] + "running_mean"
    if paddle_name.endswith("._variance"):
        return paddle_name[: -len("_variance")] + "running_var"
    return paddle_name


def _module_prefixes(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Each module of `model` with the prefix of its tensors' names (`stem.0.`), as a file
    of `model` names them and as one of a whole recognition model given for `model` as its
    backbone (`Arch.Backbone.pretrained`) does, which `load_pretrained` takes `backbone.`
    off once they are mapped: the rules, keyed by names, apply to both."""
    for name, module in model.named_modules():
        own = f"{name}." if name else ""
        yield own, module
        yield f"backbone.{own}", module


def _transposed_names(model: nn.Module) -> set[str]:
    """Names of parameters that Paddle stores transposed relative to torch."""
    names: set[str] = set()
    for dot, module in _module_prefixes(model):
        if isinstance(module, nn.Linear):
            names.add(f"{dot}weight")
        for param in getattr(module, "paddle_transposed_params", ()):
            names.add(f"{dot}{param}")
    return names


def _unused_paddle_tensors(model: nn.Module) -> set[str]:
    """Paddle names of tensors PaddleClas's modules hold and use for nothing (a module's
    `paddle_unused_params`: the fused conv beside unfolded rep branches, say)."""
    names: set[str] = set()
    for dot, module in _module_prefixes(model):
        names.update(f"{dot}{param}" for param in getattr(module, "paddle_unused_params", ()))
    return names


def _prelu_weights(model: nn.Module) -> dict[str, str]:
    """Paddle name -> torch name of each PReLU's weight, which Paddle calls `_weight`."""
    return {
        f"{dot}_weight": f"{dot}weight"
        for dot, module in _module_prefixes(model)
        if isinstance(module, nn.PReLU)
    }


def paddle_to_torch(
    paddle_state: dict[str, np.ndarray], model: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename and re-lay-out Paddle tensors for `model`.

    Returns the torch-named state and the Paddle keys dropped as carrying no
    information (unused fused convs, Paddle's bookkeeping). Keys `model` does not
    know are kept under their mapped name, so the caller can report them.
    """
    transposed = _transposed_names(model)
    ignorable = _unused_paddle_tensors(model)
    prelu_weights = _prelu_weights(model)
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for paddle_name, array in paddle_state.items():
        if paddle_name in ignorable:
            dropped.append(paddle_name)
            continue
        name = prelu_weights.get(paddle_name) or _torch_name(paddle_name)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if name in transposed and tensor.ndim == 2:
            tensor = tensor.t().contiguous()
        state[name] = tensor
    return state, dropped
