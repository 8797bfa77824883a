"""P x K batches for metric learning: P distinct classes, K images of each."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from shitu.data.samplers._common import EpochBatchSampler, make_rng
from shitu.errors import ConfigError
from shitu.registry import SAMPLERS, Size

# How many classes a warning names before summarising.
_SHOW = 5
logger = logging.getLogger(__name__)


@SAMPLERS.register("PKSampler")
class PKSampler(EpochBatchSampler):
    """Each batch: P = batch_size // sample_per_id distinct classes, sample_per_id (K) images each.

    Classes are drawn without replacement within a batch, with probability
    uniform over classes (`id_avg_prob`) or proportional to their image count
    (`sample_avg_prob`, PaddleClas's default). Images are drawn without
    replacement, or with replacement when a class has fewer than K (with a warning).

    `id_list` and `ratio` reweight classes as in PaddleClas: `id_list` is a flat
    list of inclusive [first, last] class-id ranges and each range's
    probabilities are multiplied by its `ratio` (the first matching range wins),
    then renormalised; e.g. id_list [0, 999], ratio [2.0] draws classes 0..999
    twice as often. (PaddleClas counts positions in first-appearance order,
    which equals the class id for label files sorted by label.)

    Every batch is an independent draw seeded by (seed, epoch, global batch
    number), with global batch g = b * num_replicas + rank for rank-local batch
    b: ranks get different batches, all the same number of them (about
    len(dataset) / batch_size / num_replicas per epoch; `drop_last` rounds down
    instead of up), and one process with the same seed sees the batches of all
    ranks interleaved. `shuffle` is accepted for PaddleClas configs; batches are
    random draws either way.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: Size,
        sample_per_id: Size,
        shuffle: bool = True,
        drop_last: bool = True,
        sample_method: Literal["sample_avg_prob", "id_avg_prob"] = "sample_avg_prob",
        id_list: list[int] | None = None,
        ratio: list[Annotated[float, Field(ge=0)]] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_replicas, rank, seed)
        self.check_params(batch_size, sample_per_id, id_list, ratio)
        labels = getattr(dataset, "labels", None)
        if labels is None:
            raise ConfigError(f"PKSampler: the dataset ({type(dataset).__name__}) has no labels")
        self.sample_per_id = sample_per_id
        self.classes_per_batch = batch_size // sample_per_id
        self.drop_last = drop_last
        self.num_images = len(labels)

        # Group image indices by class: class c's images are _members[_starts[c]:_starts[c + 1]].
        self.class_ids, inverse = np.unique(np.asarray(labels, dtype=np.int64), return_inverse=True)
        self._members = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(self.class_ids))
        self._starts = np.concatenate([[0], np.cumsum(counts)])

        weights = np.ones(len(counts)) if sample_method == "id_avg_prob" else counts.astype(float)
        factors = class_ratios(self.class_ids, id_list, ratio)
        weights = weights * factors
        drawable = int(np.count_nonzero(weights))
        if drawable < self.classes_per_batch:
            # the advice alone sent one whose ratio 0 left classes out to the batch size
            zeroed = int(np.count_nonzero(factors == 0))
            why = f" (ratio 0 leaves out {zeroed} of its {len(counts)})" if zeroed else ""
            raise ConfigError(
                f"PKSampler: a batch needs {self.classes_per_batch} distinct classes "
                f"(batch_size {batch_size} / sample_per_id {sample_per_id}) but the dataset has "
                f"{drawable} that can be drawn{why}; lower batch_size or raise sample_per_id"
            )
        self.class_probs = weights / weights.sum()
        if self.rank == 0:
            self._warn_of_small_classes(dataset, counts, weights)

    def _warn_of_small_classes(self, dataset: Any, counts: np.ndarray, weights: np.ndarray) -> None:
        """A class with fewer than K images fills its K places in a batch by drawing its
        images again, so its pairs show less variety than K suggests (a copy differs only by
        its augmentation): something to tell the user, who can add photos or lower K."""
        small = np.flatnonzero((counts < self.sample_per_id) & (weights > 0))
        if not len(small):
            return
        # By class id: the listed names or ids (a Grocery listing's names are its class_names).
        names = getattr(dataset, "label_keys", None) or getattr(dataset, "class_names", None)
        shown = []
        for c in small[:_SHOW].tolist():
            label = int(self.class_ids[c])
            shown.append(f"{names[label] if names is not None else label} has {counts[c]}")
        logger.warning(
            "PKSampler: %d of %d classes have fewer images than sample_per_id %d (%s%s): a "
            "batch repeats their images (each copy augmented anew) to fill its %d places for "
            "each, so their pairs show less variety; add photos of them, or lower sample_per_id",
            len(small),
            len(counts),
            self.sample_per_id,
            ", ".join(shown),
            ", ..." if len(small) > _SHOW else "",
            self.sample_per_id,
        )

    @staticmethod
    def check_params(
        batch_size: int,
        sample_per_id: int,
        id_list: list[int] | None = None,
        ratio: list[float] | None = None,
        **_others: Any,
    ) -> None:
        """Batches are whole groups of K, and `id_list` ranges come with a `ratio` each:
        also checked as a config loads (by the registry)."""
        if sample_per_id < 1:
            raise ValueError(f"sample_per_id: must be at least 1, got {sample_per_id}")
        if sample_per_id > batch_size:
            raise ValueError(
                f"sample_per_id: {sample_per_id} images of a class do not fit in a batch of "
                f"batch_size {batch_size}; lower sample_per_id or raise batch_size"
            )
        if batch_size % sample_per_id:
            raise ValueError(
                f"batch_size: {batch_size} is not a multiple of sample_per_id ({sample_per_id})"
            )
        if (id_list or ratio) and (not id_list or not ratio or len(id_list) != 2 * len(ratio)):
            raise ValueError(
                "id_list: holds [first, last] class-id pairs and ratio one factor per pair "
                f"(got {len(id_list or [])} ids and {len(ratio or [])} ratios)"
            )
        # A range written backwards holds no class: its ratio was silently never applied.
        ranges = id_list or []
        for first, last in zip(ranges[::2], ranges[1::2], strict=True):
            if first > last:
                raise ValueError(
                    f"id_list: the range [{first}, {last}] is backwards (first > last) and holds "
                    f"no class; write it [{last}, {first}]"
                )

    def __len__(self) -> int:
        per_rank = math.ceil(self.num_images / self.num_replicas)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def _batches(self, start: int) -> Iterator[list[int]]:
        for local in range(start, len(self)):
            yield self.batch(local)

    def batch(self, local: int) -> list[int]:
        """This rank's batch number `local` of the current epoch."""
        rng = make_rng(self.seed, self.epoch, local * self.num_replicas + self.rank)
        # Weighted sampling without replacement (Efraimidis-Spirakis): the P smallest
        # Exp(1) / p keys, in key order, are P sequential weighted draws.
        with np.errstate(divide="ignore"):
            keys = rng.exponential(size=len(self.class_probs)) / self.class_probs
        p = self.classes_per_batch
        chosen = np.argpartition(keys, p - 1)[:p]
        chosen = chosen[np.argsort(keys[chosen], kind="stable")]
        k = self.sample_per_id
        batch: list[int] = []
        for c in chosen.tolist():
            members = self._members[self._starts[c] : self._starts[c + 1]]
            if len(members) >= k:
                picks = rng.choice(len(members), size=k, replace=False)
            else:
                picks = rng.integers(0, len(members), size=k)
            batch.extend(members[picks].tolist())
        return batch


def class_ratios(
    class_ids: np.ndarray, id_list: list[int] | None, ratio: list[float] | None
) -> np.ndarray:
    """Per-class multipliers from PaddleClas's `id_list` ranges and `ratio` factors (as
    `PKSampler.check_params` checks them)."""
    factors = np.ones(len(class_ids))
    if not id_list or not ratio:
        return factors
    # Apply in reverse so that the first range containing a class decides its factor.
    for j in reversed(range(len(ratio))):
        first, last = id_list[2 * j], id_list[2 * j + 1]
        factors[(class_ids >= first) & (class_ids <= last)] = ratio[j]
    return factors
