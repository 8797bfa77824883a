"""Reproducible randomness: one seed per sample, independent of workers and restarts.

Augmentations draw from torch's and Python's RNGs. Seeding them per sample from
(run seed, epoch, batch, position) makes every augmented image a pure function
of its place in the run, so a resumed run (or one with a different number of
loader workers) sees exactly the images an uninterrupted run would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info


def sample_seed(run_seed: int, epoch: int, batch: int, position: int) -> int:
    """A well-mixed 63-bit seed for one sample."""
    state = np.random.SeedSequence([run_seed, epoch, batch, position]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class SeededBatchSampler:
    """Wraps a batch sampler; yields [(dataset index, sample seed), ...] batches.

    Forwards `set_epoch(epoch, start_batch)` so the batch numbers it seeds with stay
    aligned with the inner sampler after a mid-epoch resume. Under DDP each process
    (`rank` of `world_size`) seeds with global batch numbers, batch * world_size + rank:
    numbered by the process alone, the same place in every process's batch would draw the
    same augmentation (one crop, flip and rotation for each of 8 GPUs' images).
    """

    def __init__(
        self, batch_sampler: Any, run_seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.batch_sampler = batch_sampler
        self.run_seed = run_seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch, start_batch=start_batch)

    @property
    def batch_size(self) -> int:
        return self.batch_sampler.batch_size

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for offset, indices in enumerate(self.batch_sampler):
            batch = (self.start_batch + offset) * self.world_size + self.rank
            yield [
                (int(index), sample_seed(self.run_seed, self.epoch, batch, position))
                for position, index in enumerate(indices)
            ]


class SeededDataset(Dataset):
    """Loads item `index` with the RNGs seeded by `seed`; appends `index` to the item.

    In the main process (num_workers=0) the global RNG states are restored after
    loading, so data loading never disturbs the training RNG (dropout, etc.).
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        index, seed = key
        if get_worker_info() is not None:
            return self._load(index, seed)
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                return self._load(index, seed)
            finally:
                random.setstate(python_state)

    def _load(self, index: int, seed: int) -> tuple[Any, ...]:
        torch.manual_seed(seed)
        random.seed(seed)
        return (*self.dataset[index], index)


def capture_rng_state() -> dict[str, Any]:
    """The process's RNG states as tensors and lists (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # The GPUs visible now: a run resumed with fewer (CUDA_VISIBLE_DEVICES) failed
        # with an IndexError from set_rng_state_all; those it no longer sees draw nothing.
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
