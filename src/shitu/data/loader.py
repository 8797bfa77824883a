"""Dataset and batch sampler of one `DataLoader.<split>` section; errors name the section."""

from __future__ import annotations

from typing import Any

from shitu import registry
from shitu.config.schema import ComponentConfig, DataSplitConfig
from shitu.data.datasets.base import ImageDataset
from shitu.errors import ConfigError, DataError


def build_dataset(split: DataSplitConfig, where: str) -> Any:
    """The registered dataset the section names (its `transform_ops` built inside).

    Its errors (a bad key, a missing label file or image) start with `where`, so that a
    config with several datasets says which one.
    """
    registry.populate()
    try:
        dataset = registry.DATASETS.build(split.dataset.name, **split.dataset.params)
    except (ConfigError, DataError) as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    if isinstance(dataset, ImageDataset):  # its load errors name the section to set
        dataset.config_key = where
    return dataset


def build_sampler(
    split: DataSplitConfig,
    dataset: Any,
    *,
    num_replicas: int,
    rank: int,
    seed: int,
    default: ComponentConfig,
    where: str,
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
