"""Mixed precision for training and evaluation: which `Global.amp` a device can run, and how.

CUDA runs bf16 and fp16 autocast. A CPU runs bf16 autocast when it has native bfloat16
(AVX512-BF16 or AMX), which about halves a training step of the default recipe on such a
CPU (benchmarks/train_throughput.py); fp16 needs CUDA (its loss scaling is a GPU feature).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_warned: set[tuple[str, str]] = set()


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bfloat16 natively here (without it bf16 is emulated and slow)."""
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def effective_amp(amp: str, device: torch.device) -> str:
    """`amp` if `device` can run it, else "off" with a warning that says why."""
    if amp == "off" or device.type == "cuda":
        return amp
    if device.type == "cpu" and amp == "bf16":
        if cpu_has_native_bf16():
            return amp
        reason = "this CPU has no native bfloat16 (AVX512-BF16 or AMX)"
    elif amp == "fp16":
        reason = "fp16 needs a CUDA device (on a CPU with native bfloat16 use bf16)"
    else:
        reason = f"{device.type} has no {amp} autocast"
    if (amp, device.type) not in _warned:  # training and its evaluation both ask
        _warned.add((amp, device.type))
        logger.warning("Global.amp=%s: %s; running in float32", amp, reason)
    return "off"


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager[None]:
    """Autocast to `amp` (already checked by `effective_amp`); a no-op context for "off"."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[amp])


def scaled_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Step `optimizer` through `scaler` and update the loss scale; False where fp16 loss
    scaling skipped the step (its gradients overflowed), which GradScaler tells only by
    lowering the scale. A disabled scaler always steps."""
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Restore fp16 loss scaling from a checkpoint. One of a run without it (amp off or
    bf16, or fp16 on a CPU, which ran in float32) has no scale, on which GradScaler raises:
    an fp16 run resumed from it starts from the initial scale instead, with a warning."""
    if state or not scaler.is_enabled():
        scaler.load_state_dict(state)
    else:
        logger.warning(
            "Global.amp=fp16: the checkpoint ran without fp16 loss scaling; the loss scale "
            "starts from its initial value"
        )
