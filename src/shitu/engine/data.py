"""Data loaders for the engine: registered dataset + sampler, seeded per sample."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from shitu import registry
from shitu.config.schema import ComponentConfig, DataSplitConfig
from shitu.data.datasets.base import scan_progress
from shitu.data.loader import build_dataset, build_sampler
from shitu.data.samplers import DistributedBatchSampler
from shitu.engine.distributed import DistContext
from shitu.engine.seeding import SeededBatchSampler, SeededDataset
from shitu.engine.stopping import STOPPING_SIGNALS
from shitu.errors import ConfigError, first_few
from shitu.runtime import usable_cores

EVAL_SAMPLER = ComponentConfig(name="DistributedBatchSampler", batch_size=64, shuffle=False)
# Ops after which every image has one size (what a batch and the model's training need).
SIZING_OPS = ("ResizeImage", "RandCropImage", "CropImage", "RandCropImageV2")

logger = logging.getLogger(__name__)


class MixedImageSizes(ConfigError):
    """A batch of images of several sizes: the transform_ops give no one size. Met mid-epoch
    in training, it is another image of the listing, not the run, that needs the fix: the
    trainer saves the run's steps for a resume, as for an unreadable image."""


def build_loader(
    split: DataSplitConfig,
    context: DistContext,
    seed: int,
    default_sampler: ComponentConfig,
    where: str,
    worker_init: Callable[[int], None],
    progress: bool = False,
) -> DataLoader:
    """Dataset and batch sampler from the config section `where`, wrapped so every sample
    is seeded; `worker_init` sets up each worker process (its signals); `progress`: a bar
    while a skip_corrupt dataset checks its images, where stderr is a terminal.

    Batches are `(images, labels, unique_ids, dataset_indices)`. The loader has its
    own generator, so starting an epoch never draws from the global RNG.
    """
    shown = progress and context.is_main and sys.stderr.isatty()
    with scan_progress(f"checking {where}" if shown else None):
        dataset = build_dataset(split, f"{where}.dataset")
    _warn_of_raw_images(split, f"{where}.dataset.transform_ops")
    sampler = build_sampler(
        split,
        dataset,
        num_replicas=context.world_size,
        rank=context.rank,
        seed=seed,
        default=default_sampler,
        where=f"{where}.sampler",
    )
    workers = split.loader.num_workers
    _warn_of_workers_over_cores(workers, where)
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"persistent_workers": True, "prefetch_factor": 4}
    return DataLoader(
        SeededDataset(dataset),
        batch_sampler=SeededBatchSampler(sampler, seed, context.rank, context.world_size),
        collate_fn=partial(collate_one_size, where=f"{where}.dataset.transform_ops"),
        num_workers=workers,
        pin_memory=context.device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=worker_init,
        **options,
    )


def _warn_of_workers_over_cores(workers: int, where: str) -> None:
    """A one-line warning naming `{where}.loader.num_workers` where it is more than the CPU
    cores this process may run on, in place of torch's own: a multi-line Python warning,
    given twice per loader and naming no setting, which PaddleClas's GeneralRecognitionV2
    config (8 and 4 workers) raised four times on a 2-core host. Each sample is seeded
    on its own, so fewer workers change no batch."""
    cores = usable_cores()
    if not cores or workers <= cores:
        return
    warnings.filterwarnings(
        "ignore",
        message="This DataLoader will create",
        category=UserWarning,
        module=r"torch\.utils\.data\.dataloader",
    )
    logger.warning(
        "%s.loader.num_workers %d is more than the CPU cores this process may use (%d): the "
        "extra worker processes only compete for them, which may slow or stall loading; "
        "lower it (-o %s.loader.num_workers=%d)",
        where,
        workers,
        cores,
        where,
        cores,
    )


def collate_one_size(items: list[tuple[Any, ...]], where: str) -> Any:
    """A batch of `items` (image, label, unique id, index). torch stacks images only of one
    size, and says of others "stack expects each tensor to be equal size", naming no
    setting: a ConfigError names the transform_ops at `where`, which need an op that gives
    every image one size (photos of a few sizes fail only at the first batch that mixes
    them, maybe hours in)."""
    try:
        return default_collate(items)
    except RuntimeError:
        sizes = sorted({tuple(item[0].shape) for item in items})
        if len(sizes) < 2:
            raise
        raise MixedImageSizes(
            f"{where}: images of different sizes in one batch ({sizes[0]} and {sizes[1]}, "
            "channels x height x width); give them one size with a ResizeImage {size: [W, H]} "
            f"or a crop ({', '.join(SIZING_OPS[1:])})"
        ) from None


def _warn_of_raw_images(split: DataSplitConfig, where: str) -> None:
    """The model trained on normalised images of one size; without those ops it gets raw
    0-255 pixels at each photo's own size and scores badly, without an error. It happens
    most by replacing a whole `dataset` with -o, which drops its transform_ops."""
    ops = [next(iter(op.items())) for op in split.dataset.params.get("transform_ops") or []]
    missing = []  # (op, what the model gets without it)
    if "NormalizeImage" not in [name for name, _ in ops]:
        missing.append(("NormalizeImage", "unnormalised 0-255 pixels"))
    if not any(_gives_one_size(name, params) for name, params in ops):
        sizing = f"ResizeImage with size, {', '.join(SIZING_OPS[1:])}"
        missing.append((f"resize to one size ({sizing})", "each image at its own size"))
    if missing:
        logger.warning(
            "%s has no %s: the model gets %s, not what it was trained on. Replacing a whole "
            "dataset (-o ...dataset={...}) drops its transform_ops: override only the keys "
            "that change (e.g. -o ...dataset.cls_label_path=FILE), or give transform_ops too",
            where,
            " and no ".join(op for op, _ in missing),
            ", ".join(effect for _, effect in missing),
        )


def _gives_one_size(name: str, params: dict[str, Any] | None) -> bool:
    """Whether op `name` gives every image one size: a ResizeImage only by its `size`, as
    its `resize_short` keeps each photo's aspect ratio (a batch of portrait and landscape
    photos then fails to stack, at the first batch that mixes them)."""
    if name == "ResizeImage":
        return not ((params or {}).get("resize_short") or 0) > 0
    return name in SIZING_OPS


def end_quietly_on_sigterm(_worker_id: int) -> None:
    """A DataLoader's `worker_init_fn`. SIGTERM sent to the whole process group (systemd
    stopping a unit, Slurm cancelling a job, `kill -- -PGID`) kills torch's workers
    outright, and the main process, unwinding from its own SIGTERM, then reports each as
    a crash, with a traceback. A worker ends instead at once with status 0, as torch's
    workers end on the main process's own SIGTERM (with nothing to flush: the main process
    reads no more batches)."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: os._exit(0))


def leave_stopping_to_the_trainer(_worker_id: int) -> None:
    """The `worker_init_fn` of a training run's loaders. Ctrl-C in a terminal and SIGTERM
    sent to the process group reach the workers too, while the trainer stops only after
    its current step, and the evaluation of an epoch that step ends: a worker that ended
    on the signal would fail that evaluation, and one keeping the trainer's handler it was
    forked with would repeat its warning. The main process ends the workers as it stops.
    SIGHUP, from a terminal that closed, likewise."""
    for signum in STOPPING_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def end_workers(loader: DataLoader) -> None:
    """End `loader`'s persistent worker processes now, if it started any. A training run's
    workers ignore SIGTERM (see `leave_stopping_to_the_trainer`): after a failure, whose
    traceback keeps the loader alive until the interpreter exits, multiprocessing's exit
    handler would stop them with SIGTERM and wait for them forever."""
    iterator = loader._iterator  # where torch keeps persistent workers between epochs
    loader._iterator = None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def build_train_loader(
    split: DataSplitConfig, context: DistContext, seed: int, progress: bool = False
) -> DataLoader:
    if split.sampler is None:
        raise ConfigError(
            "DataLoader.Train.sampler: training needs a sampler, e.g. "
            "{name: PKSampler, batch_size: 64, sample_per_id: 4}"
        )
    loader = build_loader(
        split,
        context,
        seed,
        default_sampler=split.sampler,
        where="DataLoader.Train",
        worker_init=leave_stopping_to_the_trainer,
        progress=progress,
    )
    sampler = loader.batch_sampler.batch_sampler
    if isinstance(sampler, DistributedBatchSampler) and not sampler.shuffle and context.is_main:
        logger.warning(
            "DataLoader.Train.sampler: shuffle is false, so every epoch trains on the images "
            "in the order they are listed (a list or folders sorted by class give batches of "
            "one class or two); set shuffle: true"
        )
    return loader


def _sampler_params(sampler: ComponentConfig) -> dict[str, Any]:
    """The sampler's parameters typed as the sampler reads them (`drop_last: no`, which
    YAML leaves text, is false)."""
    registry.populate()
    return registry.SAMPLERS.validate(sampler.name, sampler.params)


def build_eval_loader(
    split: DataSplitConfig,
    context: DistContext,
    seed: int,
    where: str,
    worker_init: Callable[[int], None] = end_quietly_on_sigterm,
    progress: bool = False,
) -> DataLoader:
    """`where` names the section in errors (DataLoader.Eval.Query, DataLoader.Eval.Gallery);
    `progress` as for `build_loader`."""
    if split.sampler is not None and split.sampler.name == "PKSampler":
        raise ConfigError(
            f"{where}: sampler PKSampler draws random batches of classes, repeating some "
            "images and leaving others out, while an evaluation embeds each image once; use "
            "{name: DistributedBatchSampler, batch_size: 64}"
        )
    if split.sampler is not None and _sampler_params(split.sampler).get("drop_last"):
        raise ConfigError(
            f"{where}: sampler drop_last: true would leave images out of the "
            "evaluation; set it to false"
        )
    return build_loader(
        split,
        context,
        seed,
        default_sampler=EVAL_SAMPLER,
        where=where,
        worker_init=worker_init,
        progress=progress,
    )


def check_unreadable_elsewhere(datasets: dict[str, Any]) -> None:
    """Refuse, by config section, a dataset without skip_corrupt that lists an image which
    another one's skip_corrupt scan found missing or undecodable: it would stop the run on
    that image once it got there (an evaluation set at the first evaluation, an epoch into
    the run; a training set within an epoch), though the start-up already knew of it."""
    unreadable = {
        where: dataset.unreadable
        for where, dataset in datasets.items()
        if getattr(dataset, "unreadable", None)
    }
    if not unreadable:  # the usual case: nothing left out, nothing to compare
        return
    problems = []
    # The few unreadable paths in a set; a training list of millions is read once.
    wanted = {os.path.abspath(path) for found in unreadable.values() for path in found}
    for where, dataset in datasets.items():
        if getattr(dataset, "skip_corrupt", True):
            continue
        listed = {key for path in dataset.paths if (key := os.path.abspath(path)) in wanted}
        for other, found in unreadable.items():
            shared = [
                f"{path}: {why}" for path, why in found.items() if os.path.abspath(path) in listed
            ]
            if shared:
                problems.append(
                    f"{where} lists {len(shared)} image{'s' if len(shared) > 1 else ''} that "
                    f"{other}'s skip_corrupt left out ({first_few(shared, 3)}), and would stop "
                    f"at the first it reads: set {where}.dataset.skip_corrupt: true too, or put "
                    "the images right"
                )
    if problems:
        raise ConfigError("; ".join(problems))


def dataset_of(loader: DataLoader) -> Any:
    """The configured dataset behind a loader made by `build_loader`."""
    return loader.dataset.dataset
