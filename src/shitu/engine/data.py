"""Data loaders for the engine: registered dataset + sampler, seeded per sample."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from shitu import registry
from shitu.config.schema import ComponentConfig, DataSplitConfig
from shitu.engine.distributed import DistContext
from shitu.engine.seeding import SeededBatchSampler, SeededDataset
from shitu.errors import ConfigError

EVAL_SAMPLER = ComponentConfig(name="DistributedBatchSampler", batch_size=64, shuffle=False)


def build_loader(
    split: DataSplitConfig, context: DistContext, seed: int, default_sampler: ComponentConfig
) -> DataLoader:
    """Dataset and batch sampler from the config, wrapped so every sample is seeded.

    Batches are `(images, labels, unique_ids, dataset_indices)`. The loader has its
    own generator, so starting an epoch never draws from the global RNG.
    """
    registry.populate()
    dataset = registry.DATASETS.build(split.dataset.name, **split.dataset.params)
    sampler_config = split.sampler or default_sampler
    sampler = registry.SAMPLERS.build_with_runtime(
        sampler_config.name,
        sampler_config.params,
        dataset=dataset,
        num_replicas=context.world_size,
        rank=context.rank,
        seed=seed,
    )
    workers = split.loader.num_workers
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"persistent_workers": True, "prefetch_factor": 4}
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=SeededBatchSampler(sampler, seed),
        num_workers=workers,
        pin_memory=context.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


def build_train_loader(split: DataSplitConfig, context: DistContext, seed: int) -> DataLoader:
    if split.sampler is None:
        raise ConfigError(
            "DataLoader.Train.sampler: training needs a sampler, e.g. "
            "{name: PKSampler, batch_size: 64, sample_per_id: 4}"
        )
    return build_loader(split, context, seed, default_sampler=split.sampler)


def build_eval_loader(split: DataSplitConfig, context: DistContext, seed: int) -> DataLoader:
    if split.sampler is not None and split.sampler.params.get("drop_last"):
        raise ConfigError(
            "DataLoader.Eval: sampler drop_last: true would leave images out of the "
            "evaluation; set it to false"
        )
    return build_loader(split, context, seed, default_sampler=EVAL_SAMPLER)


def dataset_of(loader: DataLoader) -> Any:
    """The configured dataset behind a loader made by `build_loader`."""
    return loader.dataset.dataset
