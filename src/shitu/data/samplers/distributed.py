"""Plain batches of consecutive (or shuffled) indices, sharded across DDP ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from shitu.data.samplers._common import EpochBatchSampler, make_rng
from shitu.registry import SAMPLERS, Size


@SAMPLERS.register("DistributedBatchSampler")
class DistributedBatchSampler(EpochBatchSampler):
    """Batches of `batch_size` indices; rank r takes every num_replicas-th index from r.

    The epoch's order (0..N-1, or a permutation seeded by (seed, epoch) with
    `shuffle`) is dealt out round-robin, so the ranks' shares are disjoint and
    together cover the dataset. To give every rank the same number of samples,
    `drop_last: false` (evaluation) pads the order by repeating it from the
    start: the last `num_padding` positions of the padded order are duplicates
    (after gathering, keep each dataset index once, as evaluation does).
    `drop_last: true` instead cuts the order to a multiple of num_replicas and
    drops each rank's last incomplete batch.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: Size,
        shuffle: bool = False,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_replicas, rank, seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.dataset_size = len(dataset)
        world = self.num_replicas
        if drop_last:
            self.num_samples = self.dataset_size // world
        else:
            self.num_samples = math.ceil(self.dataset_size / world)
        self.total_size = self.num_samples * world
        self.num_padding = max(0, self.total_size - self.dataset_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> np.ndarray:
        """This rank's dataset indices for the current epoch, in order, padding included."""
        if self.shuffle:
            order = make_rng(self.seed, self.epoch).permutation(self.dataset_size)
        else:
            order = np.arange(self.dataset_size)
        if self.total_size > self.dataset_size and self.dataset_size:
            order = np.resize(order, self.total_size)  # repeats from the start
        else:
            order = order[: self.total_size]
        return order[self.rank :: self.num_replicas]

    def _batches(self, start: int) -> Iterator[list[int]]:
        indices = self.indices()
        size = self.batch_size
        for b in range(start, len(self)):
            yield indices[b * size : (b + 1) * size].tolist()
