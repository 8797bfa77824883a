"""Weight averaging ("model soup", Wortsman et al., ICML 2022) of runs from one initialisation.

Runs fine-tuned from the same pretrained weights with different schedules or losses
usually land in one basin of the loss, so their element-wise mean is a single model
that is often better than each of them, at no extra inference cost.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shitu.checkpoint.io import ARCH, REPARAMETERIZED, read_weights
from shitu.errors import CheckpointError

# Metadata that must agree: averaging different architectures or a folded with an
# unfolded model would give a file that loads but computes nonsense.
MUST_MATCH = (ARCH, REPARAMETERIZED)


def average_weights(
    paths: list[str | Path],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Element-wise mean of the floating-point tensors of several weight files.

    Integer tensors (e.g. batch-norm step counters) are taken from the first file. The
    files must hold the same tensor names and shapes and the same architecture metadata.
    Returns the averaged state dict and the first file's metadata.
    """
    if len(paths) < 2:
        raise CheckpointError(f"averaging needs at least two weight files, got {len(paths)}")
    first_path = paths[0]
    first, metadata = read_weights(first_path)
    sums = {name: tensor.double() for name, tensor in first.items() if tensor.is_floating_point()}
    for path in paths[1:]:
        state, other_metadata = read_weights(path)
        for key in MUST_MATCH:
            if metadata.get(key) != other_metadata.get(key):
                raise CheckpointError(
                    f"{path}: its {key} differs from {first_path}'s; "
                    "only weights of the same model can be averaged"
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
                sums[name] += tensor.double()
    averaged = {
        name: (sums[name] / len(paths)).to(tensor.dtype) if name in sums else tensor
        for name, tensor in first.items()
    }
    return averaged, metadata
