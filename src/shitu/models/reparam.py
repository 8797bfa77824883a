"""Structural re-parameterisation: fold training-time branches into inference-time layers."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Call `reparameterize()` on every submodule that defines it (e.g. PP-LCNetV2's rep blocks).

    Uses BatchNorm running statistics, so eval-mode outputs are unchanged. Returns `model`.
    """
    for module in list(model.modules()):
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    return model


def is_reparameterized(model: nn.Module) -> bool:
    return any(getattr(m, "is_repped", False) for m in model.modules())
