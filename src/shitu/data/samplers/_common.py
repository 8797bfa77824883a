"""What the batch samplers share: DDP rank resolution, epochs, mid-epoch resumption."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.distributed as dist

from shitu.errors import ConfigError


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """(world size, rank) as given, else from torch.distributed if initialised, else (1, 0)."""
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ConfigError(f"sampler: rank {rank} is not in 0..{num_replicas - 1}")
    return num_replicas, rank


def make_rng(*keys: int) -> np.random.Generator:
    """A generator determined by `keys` alone (run seed, epoch, batch, ...): no global state."""
    return np.random.default_rng([key % (1 << 64) for key in keys])


class EpochBatchSampler:
    """Base of the batch samplers: batches are a pure function of (seed, epoch, batch number).

    `set_epoch(epoch, start_batch=n)` selects the epoch and skips its first n
    batches, so a run resumed after n steps sees exactly the batches an
    uninterrupted one would have. The setting stays until the next `set_epoch`.
    `len()` is always the full epoch's number of batches for this rank.
    """

    def __init__(self, batch_size: int, num_replicas: int | None, rank: int | None, seed: int):
        if batch_size < 1:
            raise ConfigError(
                f"{type(self).__name__}: batch_size must be at least 1, got {batch_size}"
            )
        self.batch_size = batch_size
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must not be negative, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)} (batches/epoch)")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        raise NotImplementedError

    def _batches(self, start: int) -> Iterator[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        return self._batches(self.start_batch)
