"""Device choice and multi-process (torchrun / DDP) helpers.

A run launched by `torchrun` has RANK/WORLD_SIZE/LOCAL_RANK in its environment;
anything else is a single process. Collective helpers are no-ops then, so the
training and evaluation code reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shitu.errors import ConfigError
from shitu.inference.choices import device_type


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device  # cuda:LOCAL_RANK under torchrun with GPUs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA when present; 'gpu'/'cuda' insists on it (`device_type`)."""
    if device_type(preference) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(  # PaddleClas's configs ship `device: gpu`
                f"Global.device: '{preference}' asked for, but no CUDA GPU is visible; set "
                "auto (a GPU where there is one) or cpu (-o Global.device=auto)"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launched_rank() -> int:
    """This process's rank as torchrun launched it (0 for a single process), known before
    the process group is joined."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(preference: str) -> DistContext:
    """Join the torchrun process group if launched by torchrun; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_concat(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Concatenate each rank's `tensor` (same shape on every rank) in rank order."""
    if not context.distributed:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def all_reduce_mean(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    if not context.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / context.world_size


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()
