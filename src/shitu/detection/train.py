"""Training PicoDet: SGD + cosine schedule with warm-up, EMA of the weights, multi-scale
batches, SimOTA/VFL/GIoU/DFL losses, COCO mAP evaluation, atomic checkpoints + resume.

Reuses the recognition engine's pieces: learning-rate schedules, parameter groups,
per-sample seeding and the checkpoint format, so a resumed run repeats exactly the
steps an uninterrupted run would take.
"""

from __future__ import annotations

import copy
import logging
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from shitu.config.schema import LRConfig, OptimizerConfig
from shitu.detection.coco_eval import evaluate_boxes
from shitu.detection.data import DetectionDataset, clip_boxes, collate
from shitu.detection.detector import detections_in_image, preprocess
from shitu.detection.input_size import check_input_size
from shitu.detection.losses import picodet_loss
from shitu.detection.model import PicoDet, PicoDetArch, build_picodet
from shitu.detection.weights import save_detector
from shitu.engine.batch_norm import norm_on_one_value_per_channel
from shitu.engine.data import end_workers, leave_stopping_to_the_trainer
from shitu.engine.lr import Cosine, Stage
from shitu.engine.optim import build_optimizer, set_learning_rate
from shitu.engine.seeding import (
    SeededBatchSampler,
    SeededDataset,
    capture_rng_state,
    restore_rng_state,
    seed_everything,
)
from shitu.engine.state import LATEST, SUFFIX, Progress, load_training_state, save_training_state
from shitu.engine.stopping import STOPPING_SIGNALS, leave_a_closed_terminal
from shitu.engine.trainer import TrainingDiverged
from shitu.errors import CheckpointError, ConfigError, DataError

logger = logging.getLogger(__name__)

# The schedule's warnings name the setting to change: detect-train's, not `shitu train`'s
# Global.epochs.
DETECTION_RUN = Stage("the run", "detect-train's --epochs")


@dataclass
class DetectionTrainConfig:
    """Defaults: PicoDet-S's published recipe (lr 0.4 for 4 x 80 images, cosine over 300
    epochs, weight decay 4e-5, EMA 0.9998) scaled linearly to one batch of 80."""

    arch: str = "picodet_s_esnet"
    epochs: int = 300
    batch_size: int = 80
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 4e-5
    warmup_epochs: int = 1
    warmup_start_lr: float = 0.01
    ema_decay: float = 0.9998
    train_sizes: tuple[int, ...] = (352, 384, 416, 448, 480)
    eval_size: int = 416
    seed: int = 0
    num_workers: int = 0
    output_dir: str = "output/detector"
    # Also checkpoint every so many steps within an epoch (None: at its end only): an epoch
    # of a COCO-sized set takes an hour or more, which a run killed outright (SIGKILL, the
    # host's end) would lose, as `shitu train`'s Global.checkpoint_every_steps.
    checkpoint_every_steps: int | None = None

    def __post_init__(self) -> None:
        """Checked here, for Python callers too: a bad value otherwise fails steps into the
        run (an empty size list at the first batch) or trains nothing (a zero rate)."""

        def refuse(name: str, expected: str) -> None:
            value = getattr(self, name)
            raise ConfigError(f"DetectionTrainConfig.{name}: expected {expected}, got {value!r}")

        counts = [("epochs", 1), ("batch_size", 1), ("warmup_epochs", 0), ("num_workers", 0)]
        if self.checkpoint_every_steps is not None:
            counts.append(("checkpoint_every_steps", 1))
        for name, least in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                refuse(name, f"a whole number >= {least}")
        # As the recogniser's Global.seed: numpy refuses negative seeds, torch those of
        # 2**64 and more, which a seed plus an epoch must stay under.
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            refuse("seed", "a whole number from 0 to 2**63 - 1")
        if not self.learning_rate > 0:
            refuse("learning_rate", "a number above 0")
        for name in ("warmup_start_lr", "weight_decay"):
            if not getattr(self, name) >= 0:
                refuse(name, "a number >= 0")
        for name in ("momentum", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                refuse(name, "a number in [0, 1)")
        for name, sizes in (("train_sizes", self.train_sizes), ("eval_size", (self.eval_size,))):
            try:
                for size in sizes or [None]:  # None: no size at all is refused too
                    check_input_size(size)
            except ConfigError:
                refuse(name, "a positive multiple of 32 (PicoDet's strides)")


class ModelEMA:
    """Exponential moving average of the weights; the decay ramps up as min(d, (1+t)/(10+t))
    so early averages are not dominated by the random initialisation."""

    def __init__(self, model: PicoDet, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_value, value in zip(
            self.model.state_dict().values(), model.state_dict().values(), strict=True
        ):
            if ema_value.is_floating_point():
                ema_value.mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                ema_value.copy_(value)


class EpochBatches:
    """Shuffled index batches, the order a pure function of (seed, epoch); resumable.
    The last partial batch is dropped (as PicoDet trains: BN needs full batches)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(1, self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        for b in range(self.start_batch, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


@torch.inference_mode()
def evaluate_detector(
    model: PicoDet,
    dataset: DetectionDataset,
    size: int,
    progress: bool = False,
) -> dict[str, float]:
    """COCO mAP of `model` on `dataset`'s images (un-augmented) at input `size`, its crowd
    regions and difficult boxes ignored; `progress` draws a bar on stderr (a COCO-sized set
    takes minutes).

    Keeps the 200 best boxes per class before NMS (an untrained model scores
    everything alike, and NMS costs grow with the candidates).
    """
    model.eval()
    detections, truths, difficult = [], [], []
    for index in tqdm(range(len(dataset)), "evaluating", unit="img", disable=not progress):
        image = np.asarray(dataset.load_image(index))
        # Clipped to the photo as the detections are (and as training sees them), also where
        # the annotations record no size to clip them to as they load: a box past the edge
        # would otherwise never overlap its detection fully.
        boxes, labels = dataset.targets(index)
        boxes, kept = clip_boxes(boxes, np.arange(len(boxes)), image.shape[1], image.shape[0])
        truths.append((boxes, labels[kept]))
        difficult.append(dataset.difficult[index][kept])
        scores, predicted = model.predict(torch.from_numpy(preprocess(image, (size, size))[None]))
        detections.append(
            detections_in_image(
                scores[0].numpy(),
                predicted[0].numpy(),
                image.shape[:2],
                (size, size),
                0.025,
                100,
                class_agnostic=False,
                nms_top_k=200,
            )
        )
    return evaluate_boxes(detections, truths, crowds=dataset.crowds, difficult=difficult)


class DetectionTrainer:
    """Builds the detector for `dataset`'s classes and trains it. The model is built after
    seeding, so `config.seed` fixes the initial weights as well as the data order."""

    def __init__(self, dataset: DetectionDataset, config: DetectionTrainConfig) -> None:
        if not any(len(boxes) for boxes in dataset.boxes):
            # Every image background: the run would "converge" at once to a model that never
            # finds anything, hours of training later.
            raise DataError(
                f"the training data's {len(dataset)} images hold no boxes (none annotated, or "
                "none inside their image); a detector cannot learn from it"
            )
        seed_everything(config.seed)
        model = build_picodet(
            config.arch,
            num_classes=len(dataset.class_names),
            class_names=dataset.class_names,
            input_size=config.eval_size,
        )
        _check_batch_norm_can_train(model, min(config.batch_size, len(dataset)), config)
        self.model, self.dataset, self.config = model, dataset, config
        self.ema = ModelEMA(model, config.ema_decay)
        batches = EpochBatches(len(dataset), config.batch_size, config.seed)
        self.sampler = SeededBatchSampler(batches, config.seed)
        self.loader = DataLoader(
            SeededDataset(dataset),
            batch_sampler=self.sampler,
            collate_fn=list,
            num_workers=config.num_workers,
            worker_init_fn=leave_stopping_to_the_trainer,
            # kept between epochs, and so where `end_workers` can end them when `train` does
            persistent_workers=config.num_workers > 0,
        )
        lr_config = LRConfig(name="Cosine", learning_rate=config.learning_rate)
        optim_config = OptimizerConfig(
            name="Momentum",
            lr=lr_config,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.optimizer = build_optimizer([model], optim_config, config.learning_rate)
        self.schedule = Cosine(
            config.learning_rate,
            len(batches),
            config.epochs,
            warmup_epoch=config.warmup_epochs,
            warmup_start_lr=config.warmup_start_lr,
            stage=DETECTION_RUN,
        )
        self.progress = Progress()
        self.history: list[dict[str, float]] = []
        self.stop_signal: int | None = None  # the signal that stopped `train`, if one did

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.config.output_dir) / f"{LATEST}{SUFFIX}"

    def input_size_for(self, step: int) -> int:
        """The input size of a step's batch: a pure function of (seed, step)."""
        return random.Random(self.config.seed * 1_000_003 + step).choice(self.config.train_sizes)

    def train_step(self, items: list) -> dict[str, float]:
        step = self.progress.global_step
        images, targets = collate(items, self.input_size_for(step))
        lr = self.schedule.lr_at(step)
        set_learning_rate(self.optimizer, lr)
        self.model.train()
        cls_logits, reg_dists = self.model(images)
        if not all(torch.isfinite(output).all() for output in [*cls_logits, *reg_dists]):
            # checked before the loss, whose assigner fails on NaN scores with torch's "all
            # elements of input should be between 0 and 1"
            raise self._diverged("the network's outputs became NaN or infinite")
        arch = self.model.arch
        losses = picodet_loss(cls_logits, reg_dists, targets, list(arch.strides), arch.cell_offset)
        if not torch.isfinite(losses["loss"]):
            raise self._diverged(f"the loss became {float(losses['loss'].detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer.step()
        self.ema.update(self.model)
        self.progress.global_step += 1
        record = {k: float(v.detach()) for k, v in losses.items()} | {"lr": lr, "step": step}
        self.history.append(record)
        return record

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error of a step that diverged, raised before its backward: the run would
        otherwise go on for every epoch left, writing checkpoints and a model of NaN
        weights that find nothing. Where the run left a checkpoint, the advice names its
        folder: a new run there is refused beside it, and it resumes at this rate only."""
        again = (
            f"train again with a learning rate below {self.config.learning_rate:g} "
            "(detect-train's --lr)"
        )
        if self.checkpoint_path.is_file():
            again += (
                f", into another folder than {self.config.output_dir} (or remove it): its "
                "latest.pt resumes only at the rate that diverged"
            )
        return TrainingDiverged(
            f"{what} at step {self.progress.global_step + 1} (epoch {self.progress.epoch + 1}): "
            f"training diverged; {again}"
        )

    # Settings a resumed run must share with the run it continues: the data order and the
    # batches depend on them (epochs may grow, to train longer).
    SAME_RUN = ("batch_size", "seed", "train_sizes", "learning_rate")

    def _check_same_run(self, path: str | Path, saved: dict[str, Any]) -> None:
        current = asdict(self.config)
        changed = [
            key
            for key in self.SAME_RUN
            if key in saved and _as_list(saved[key]) != _as_list(current[key])
        ]
        if changed:
            details = "; ".join(f"{k}: {saved[k]} there, {current[k]} here" for k in changed)
            raise CheckpointError(
                f"{path}: resuming with other settings would not continue that run ({details})"
            )

    def train(
        self,
        max_steps: int | None = None,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train until `config.epochs` (or `max_steps` more steps); checkpoint each epoch.
        `on_step` sees each step's losses and learning rate (for logging).

        Called from the main thread, Ctrl-C (SIGINT) or SIGTERM stops the run after its
        current step with a checkpoint to resume from, and `stop_signal` names the signal;
        an epoch can take hours, which a stop would otherwise lose. A second signal acts at
        once, without a checkpoint."""
        self.stop_signal = None
        done = 0
        with self._stopping_on_signals(), self._ending_workers():
            while self.progress.epoch < self.config.epochs:
                self.sampler.set_epoch(self.progress.epoch, self.progress.batch_in_epoch)
                for items in self._epoch_batches():
                    if max_steps is not None and done >= max_steps:
                        return self.history
                    if self.stop_signal is not None:
                        self.save()  # mid-epoch: the resume goes on from the next step
                        return self.history
                    record = self.train_step(items)
                    if on_step is not None:
                        on_step(record)
                    self.progress.batch_in_epoch += 1
                    done += 1
                    if self._checkpoint_due():
                        self.save()
                self.progress.epoch += 1
                self.progress.batch_in_epoch = 0
                self.save()
                if self.stop_signal is not None:
                    return self.history
        return self.history

    def _checkpoint_due(self) -> bool:
        """Whether `config.checkpoint_every_steps` asks for a checkpoint after this step;
        an epoch's last step is checkpointed at the epoch's end."""
        every = self.config.checkpoint_every_steps
        return (
            every is not None
            and self.progress.global_step % every == 0
            and self.progress.batch_in_epoch < len(self.sampler)
        )

    def _epoch_batches(self) -> Iterator[list]:
        """The epoch's batches. One that cannot be loaded (an image unreadable since the
        start, a corrupt copy) checkpoints the steps done before the error goes on: with
        the file mended, the run resumes there, not at the epoch's start, hours earlier."""
        batches = iter(self.loader)
        while True:
            try:
                items = next(batches)
            except StopIteration:
                return
            except DataError:
                path = self.save()
                logger.warning(
                    "a batch could not be loaded; the run so far is saved in %s: resume it "
                    "with --resume once the image is mended",
                    path,
                )
                raise
            yield items

    @contextmanager
    def _ending_workers(self) -> Iterator[None]:
        """The data loader's workers ended when training does, an error included: they
        leave stopping to the trainer (ignoring SIGTERM), so the exit handler of a process
        that failed with them alive would wait for them forever."""
        try:
            yield
        finally:
            end_workers(self.loader)

    @contextmanager
    def _stopping_on_signals(self) -> Iterator[None]:
        """SIGINT, SIGTERM and SIGHUP handled by `_on_signal` while training (the main thread
        only may set handlers: elsewhere they act as they would)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._previous_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in STOPPING_SIGNALS
        }
        try:
            yield
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        leave_a_closed_terminal(signum)
        if self.stop_signal is not None:  # a second one: as without this handler
            signal.signal(signum, self._previous_handlers[signal.Signals(signum)])
            signal.raise_signal(signum)
            return
        self.stop_signal = signum
        logger.warning(
            "%s: stopping after this step, with a checkpoint (send it again to stop at once, "
            "without one)",
            signal.Signals(signum).name,
        )

    def evaluate(self) -> dict[str, float]:
        return evaluate_detector(self.ema.model, self.dataset, self.config.eval_size)

    def save(self) -> Path:
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng_state(),
            "arch": self.model.arch.to_dict(),
            "config": asdict(self.config),
            "train_listing": self.dataset.listing_digest,
        }
        return save_training_state(self.checkpoint_path, state, self.progress)

    def export(self, path: str | Path) -> Path:
        """The EMA weights as a detector checkpoint for `load_detector` / `shitu detect`."""
        return save_detector(self.ema.model, path)

    def resume(self, path: str | Path) -> None:
        state, progress = load_training_state(path, option="--resume", kind="detector")
        saved = PicoDetArch.from_dict(state["arch"]).to_dict()
        # input_size is only the evaluation/export default; every other field shapes weights
        current = self.model.arch.to_dict()
        changed = [k for k in current if k != "input_size" and saved[k] != current[k]]
        if changed:
            details = "; ".join(f"{k}: {saved[k]} there, {current[k]} here" for k in changed)
            raise CheckpointError(f"{path} was trained with a different detector ({details})")
        self._check_same_run(path, state.get("config", {}))
        if progress.epoch > self.config.epochs:  # it would train nothing, and export that
            raise CheckpointError(
                f"{path}: its run has done {progress.epoch} epochs, more than the "
                f"{self.config.epochs} this one is set to; give at least {progress.epoch}"
            )
        saved_listing = state.get("train_listing")
        if saved_listing is not None and saved_listing != self.dataset.listing_digest:
            logger.warning(
                "%s: resuming with other training images, boxes or labels than the run had: it "
                "goes on from its step, but draws other batches than it would have",
                path,
            )
        self.progress = progress
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])


def _check_batch_norm_can_train(model: PicoDet, images: int, config: DetectionTrainConfig) -> None:
    """A ConfigError for batches of one image at a size where a BatchNorm gets one value
    per channel (a level of one cell): the first such step failed with torch's "Expected
    more than 1 value per channel when training". Found by forward passes (see
    `shitu.engine.batch_norm`), from the smallest size up to the first that trains."""
    if images != 1:
        return
    too_small: list[int] = []
    found = None
    for size in sorted(set(config.train_sizes)):
        hit = norm_on_one_value_per_channel(model, torch.zeros(3, size, size))
        if hit is None:
            break
        too_small, found = [*too_small, size], hit
    if found is None:
        return
    largest = too_small[-1]
    raise ConfigError(
        f"batches of one image cannot train at input sizes {too_small}, where "
        f"{found.describe(largest, largest)}, and BatchNorm cannot train on that; give "
        f"sizes above {largest}, or a batch size and a training set of at least 2 images"
    )


def _as_list(value: Any) -> Any:
    """Tuples come back from a checkpoint as lists."""
    return list(value) if isinstance(value, tuple | list) else value
