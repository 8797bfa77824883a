"""A DataLoader from one `DataLoader.<split>` config section: dataset, transforms, sampler."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from shitu import registry
from shitu.config.schema import ComponentConfig, DataSplitConfig
from shitu.errors import ConfigError

DEFAULT_SAMPLER = ComponentConfig(name="DistributedBatchSampler", batch_size=64, shuffle=False)


def build_dataset(split: DataSplitConfig, where: str = "dataset") -> Any:
    """The registered dataset the section names (its `transform_ops` built inside)."""
    registry.populate()
    try:
        return registry.DATASETS.build(split.dataset.name, **split.dataset.params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def build_sampler(
    split: DataSplitConfig,
    dataset: Any,
    *,
    num_replicas: int | None = None,
    rank: int | None = None,
    seed: int = 0,
    default: ComponentConfig = DEFAULT_SAMPLER,
    where: str = "sampler",
) -> Any:
    """The section's batch sampler (or `default`), given the runtime DDP arguments."""
    registry.populate()
    config = split.sampler or default
    try:
        return registry.SAMPLERS.build_with_runtime(
            config.name,
            config.params,
            dataset=dataset,
            num_replicas=num_replicas,
            rank=rank,
            seed=seed,
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def build_dataloader(
    split: DataSplitConfig,
    *,
    num_replicas: int | None = None,
    rank: int | None = None,
    seed: int = 0,
    default_sampler: ComponentConfig = DEFAULT_SAMPLER,
    pin_memory: bool | None = None,
    where: str = "DataLoader",
) -> DataLoader:
    """dataset -> batch sampler -> DataLoader of (images [B,3,H,W], labels [B], unique_ids [B]).

    Without a `sampler` section, `default_sampler` (DistributedBatchSampler, 64,
    no shuffling) is used. `pin_memory` defaults to whether CUDA is available.
    Workers are persistent, and seeded from `seed` through the loader's own
    generator, so augmentations repeat for a given seed and worker count. For
    exact resumption independent of the worker count, the engine seeds every
    sample instead (see `shitu.engine.seeding`). `loader.use_shared_memory` is
    accepted for PaddleClas configs; torch always passes worker batches through
    shared memory.
    """
    dataset = build_dataset(split, f"{where}.dataset")
    sampler = build_sampler(
        split,
        dataset,
        num_replicas=num_replicas,
        rank=rank,
        seed=seed,
        default=default_sampler,
        where=f"{where}.sampler",
    )
    workers = split.loader.num_workers
    options: dict[str, Any] = {"persistent_workers": True} if workers > 0 else {}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )
