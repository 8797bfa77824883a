"""The training loop: config in, checkpoints and a metrics log out; resumable to the step."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from shitu import registry
from shitu.checkpoint import load_weights, model_metadata, save_weights
from shitu.checkpoint.io import (
    LoadReport,
    fitting_tensors,
    setting_differences,
    settings_as_built,
    weight_shaping_arch,
)
from shitu.config.schema import ShituConfig
from shitu.engine.batch_norm import norm_on_one_value_per_channel
from shitu.engine.data import (
    MixedImageSizes,
    build_train_loader,
    check_unreadable_elsewhere,
    dataset_of,
    end_workers,
    leave_stopping_to_the_trainer,
)
from shitu.engine.distributed import DistContext, all_reduce_mean, barrier, init_distributed
from shitu.engine.ema import WeightEMA
from shitu.engine.evaluate import NonFiniteFeatures, RetrievalEvaluation
from shitu.engine.lr import RUN, LRSchedule, Stage
from shitu.engine.metrics_log import LOG_NAME, MetricsLog
from shitu.engine.optim import OPTIMIZER_CLASSES, build_optimizer, set_learning_rate
from shitu.engine.precision import autocast_for, effective_amp, load_scaler_state, scaled_step
from shitu.engine.seeding import capture_rng_state, restore_rng_state, seed_everything
from shitu.engine.state import (
    BEST,
    FINAL,
    LATEST,
    RUN_FILES,
    SUFFIX,
    Progress,
    load_training_state,
    resolve_checkpoint,
    save_training_state,
)
from shitu.engine.stopping import STOPPING_SIGNALS, leave_a_closed_terminal
from shitu.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ShituError,
    override_word,
    raised_message,
    weight_file_setting,
)
from shitu.evaluation.retrieval import RetrievalEvaluator
from shitu.fileio import home_expanded, remove_unfinished_writes, write_atomically
from shitu.losses.combined import CombinedLoss, split_loss_params
from shitu.losses.xbm import CrossBatchMemory
from shitu.models import RecModel, build_model
from shitu.models.rec_model import one_image_outputs
from shitu.models.reparam import is_reparameterized
from shitu.registry import problem_list

logger = logging.getLogger(__name__)


class TrainingDiverged(ShituError):
    """The loss became NaN or infinite."""


@dataclass
class FitResult:
    progress: Progress
    finished: bool  # False when stopped early (step/time limit or a signal); resume to go on
    output_dir: Path
    stop_signal: int | None = None  # the signal (SIGINT, SIGTERM) that stopped it, if one did


def check_training_sections(config: ShituConfig) -> None:
    """A ConfigError listing each section training needs that `config` lacks."""
    problems = [
        f"{section}: training needs this section"
        for section in ("Loss", "Optimizer")
        if getattr(config, section) is None
    ]
    if config.Loss is not None and not config.Loss.Train:
        problems.append("Loss.Train: list at least one loss")
    if config.DataLoader is None or config.DataLoader.Train is None:
        problems.append("DataLoader.Train: training needs a training dataset")
    else:
        problems += _output_dir_in_class_folders(config)
        problems += _eval_metric_not_computed(config)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(problem_list(len(problems), "the config for training", problems))


def _eval_metric_not_computed(config: ShituConfig) -> list[str]:
    """Global.eval_metric picks a training run's best_model among the metrics Metric.Eval
    computes: one it does not compute stopped the run once its model and data were built.
    Training's only: `shitu eval` prints whatever Metric.Eval gives (it was refused for
    asking for recall@10 alone, with the eval_metric recall@1 it does not use)."""
    if config.DataLoader.Eval is None or not config.Global.eval_during_train:
        return []
    computed = RetrievalEvaluator.from_metric_config(
        config.Metric.Eval if config.Metric else None, re_ranking=config.Global.re_ranking
    ).metric_names
    if config.Global.eval_metric in computed:
        return []
    return [
        f"Global.eval_metric: '{config.Global.eval_metric}' is not computed; Metric.Eval "
        f"gives {', '.join(computed)}"
    ]


def _output_dir_in_class_folders(config: ShituConfig) -> list[str]:
    """Global.output_dir inside (or at) the root of a folder-per-class dataset: its folder
    (and a LinearProbe's within it) would be read as one more class, by this run's
    datasets already (`shitu train` makes the folder first) and by every later one."""
    splits = {"DataLoader.Train": config.DataLoader.Train}
    if config.DataLoader.Eval is not None:
        splits["DataLoader.Eval.Query"] = config.DataLoader.Eval.Query
        splits["DataLoader.Eval.Gallery"] = config.DataLoader.Eval.Gallery
    output_dir = config.Global.output_dir
    problems = []
    for key, split in splits.items():
        if split is None or split.dataset.name != "ImageFolderDataset":
            continue
        root = split.dataset.params.get("root")
        if isinstance(root, str) and (
            Path(output_dir).resolve().is_relative_to(Path(home_expanded(root)).resolve())
        ):
            problems.append(
                f"Global.output_dir {output_dir} lies inside {key}.dataset.root {root}, "
                "whose folders are its classes: the run's folder would be read as one; give "
                "an output_dir outside it"
            )
    return problems


class Trainer:
    """Trains `config` on this process (and its torchrun peers, if any).

    `Global.checkpoints` resumes a run exactly: model, optimizer, schedule, loss state
    (e.g. XBM memory), RNG states and the position inside the epoch are restored,
    and augmentations are seeded per sample, so the continued run matches an
    uninterrupted one step for step.
    """

    def __init__(
        self,
        config: ShituConfig,
        context: DistContext | None = None,
        progress: bool = True,
        stage: Stage = RUN,
    ) -> None:
        """`progress`: a bar per epoch and evaluation (and while a skip_corrupt dataset
        checks its images) where stderr is a terminal, and a line per logged step where it
        is not (a file or a pipe, whose log a bar would fill with carriage-return redraws);
        False: neither. `stage`: what messages call this training (a LinearProbe run's
        probe or fine-tuning), and whether its checkpoint is resumed."""
        check_training_sections(config)
        if config.LinearProbe is not None:
            raise ConfigError(
                "LinearProbe: a Trainer runs one stage; `shitu train` runs both, or train "
                "shitu.engine.linear_probe.probe_stage(config), then fine_tune_stage(config)"
            )
        self.config = config
        self.stage = stage
        self.shows_progress = progress
        self.context = context or init_distributed(config.Global.device)
        self.output_dir = Path(config.Global.output_dir)
        resume_payload: dict[str, Any] | None = None
        self.progress = Progress()
        if config.Global.checkpoints:
            resume_payload, self.progress = load_training_state(config.Global.checkpoints)
        self.seed = self._choose_seed(resume_payload)
        seed_everything(self.seed + self.context.rank)

        # A resume loads every weight from its checkpoint, and Global.pretrained_model (the
        # shipped model, a probe's weights) most often every backbone weight: the backbone's
        # pretrained file (a package, a path on the machine that started the run) is read
        # only where weights are left to it.
        from_file = resume_payload is None and bool(config.Global.pretrained_model)
        self.model = self._build_model(pretrained=resume_payload is None and not from_file)
        if from_file:
            report = self._load_pretrained_model()
            left = [n for n in report.missing + report.shape_mismatch if n.startswith("backbone.")]
            if left and config.Arch.backbone_pretrained():
                seed_everything(self.seed + self.context.rank)  # new layers as one build has them
                self.model = self._build_model(pretrained=True)
                report = self._load_pretrained_model()
        self.model = self.model.to(self.context.device)
        if config.Global.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # What the run starts from, for the summary a user sees before a long run.
        if resume_payload is not None:
            self.initial_weights = f"resumed from {config.Global.checkpoints}"
            self._warn_of_unused_pretrained_model(resume_payload)
        elif from_file:
            self.initial_weights = f"{config.Global.pretrained_model} ({report.summary()})"
            if not report.complete and self.context.is_main:
                # The shipped model's file, say, holds no classifier, or one of other classes
                # (which was not said to start afresh): what becomes of them.
                unfit = " or ".join(
                    kind
                    for kind, names in (
                        ("missing", report.missing),
                        ("of another shape", report.shape_mismatch),
                    )
                    if names
                )
                afresh = f"; those {unfit} start afresh, as the config initialises them"
                logger.warning(
                    "pretrained_model %s%s", self.initial_weights, afresh if unfit else ""
                )
        else:
            self.initial_weights = (
                f"as the config initialises the model: {config.Arch.initialisation()}"
            )
        self.ema = WeightEMA(self.model, config.EMA.decay) if config.EMA else None
        self.loss = CombinedLoss(config.Loss.Train).to(self.context.device)
        self.loss.attach(self.model)  # before a resume restores the loss's state
        self.train_loader = build_train_loader(
            config.DataLoader.Train, self.context, self.seed, progress
        )
        _check_class_count(config, dataset_of(self.train_loader), warn=self.context.is_main)
        _check_scores_of_other_outputs(self.loss, self.model, dataset_of(self.train_loader))
        if self.context.is_main:
            _warn_of_one_class(dataset_of(self.train_loader))
        _check_last_batch(
            self.train_loader.batch_sampler.batch_sampler,
            self.model,
            dataset_of(self.train_loader),
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            images = len(dataset_of(self.train_loader))
            processes = self.context.world_size
            share = f" shared by {processes} processes" if processes > 1 else ""
            raise ConfigError(
                f"DataLoader.Train: the dataset's {images} images{share} give no full batch "
                f"of {self.train_loader.batch_sampler.batch_size}; lower sampler.batch_size "
                "or set drop_last: false"
            )
        _check_memory_holds_past_batches(self.loss, self.train_loader.batch_sampler.batch_size)
        if self.context.is_main:
            _warn_of_unused_memory(self.loss, self.steps_per_epoch, config.Global.epochs, stage)
            _warn_of_memory_above_the_images(self.loss, len(dataset_of(self.train_loader)))
            _warn_of_a_batch_above_the_images(
                self.train_loader.batch_sampler.batch_sampler,
                scaled=config.Optimizer.lr.base_batch_size is not None,
            )
        self.learning_rate = self._scaled_learning_rate()
        self.optimizer = build_optimizer(
            [self.model, self.loss], config.Optimizer, self.learning_rate
        )
        lr_config = config.Optimizer.lr
        self.schedule: LRSchedule = registry.LR_SCHEDULES.build_with_runtime(
            lr_config.name,
            {
                "learning_rate": self.learning_rate,
                "warmup_epoch": lr_config.warmup_epoch,
                **lr_config.params,
            },
            steps_per_epoch=self.steps_per_epoch,
            epochs=config.Global.epochs,
            stage=stage,
        )
        self.amp = effective_amp(config.Global.amp, self.context.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        if resume_payload is not None:
            self._restore(resume_payload)
        self.net: nn.Module = self.model
        if self.context.distributed:
            device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=device_ids)
        self.evaluation: RetrievalEvaluation | None = None
        if config.Global.eval_during_train and config.DataLoader.Eval is not None:
            self.evaluation = RetrievalEvaluation(
                config, self.context, self.seed, leave_stopping_to_the_trainer, progress
            )
            unreached = config.Global.unreached_eval_interval()
            unevaluated = config.Global.epochs % config.Global.eval_interval
            if unreached is not None and self.context.is_main:
                logger.warning(
                    "%s: nothing is evaluated and no best_model.safetensors is written; lower "
                    "eval_interval (or evaluate final_model.safetensors with shitu eval)",
                    unreached,
                )
            elif unevaluated and self.context.is_main:
                logger.warning(
                    "Global.epochs %d is not a multiple of Global.eval_interval %d: the last "
                    "%s not evaluated, and best_model.safetensors is chosen without %s "
                    "(evaluate final_model.safetensors with shitu eval)",
                    config.Global.epochs,
                    config.Global.eval_interval,
                    "epoch is" if unevaluated == 1 else f"{unevaluated} epochs are",
                    "it" if unevaluated == 1 else "them",
                )
        elif config.Global.eval_during_train and self.context.is_main:
            logger.warning(
                "DataLoader.Eval: the config has none, so nothing is evaluated and no "
                "best_model.safetensors is written; add the section (Query, and Gallery), or "
                "set Global.eval_during_train: false"
            )
        # Where the output folder's latest.pt left the run, if it holds one: what a run
        # stopped at once (a second Ctrl-C) is resumed from.
        self.checkpointed: Progress | None = None
        datasets = {"DataLoader.Train": dataset_of(self.train_loader)}
        if self.evaluation is not None:
            datasets.update(self.evaluation.datasets())
        check_unreadable_elsewhere(datasets)
        if self.context.is_main and "DataLoader.Eval.Query" in datasets:
            _warn_of_trained_queries(
                datasets["DataLoader.Train"], datasets["DataLoader.Eval.Query"]
            )
        if resume_payload is not None:
            self._forget_best_of_other_evaluation_images(resume_payload)
            checkpoint = resolve_checkpoint(config.Global.checkpoints)
            self._carry_over_from(checkpoint.parent)
            if checkpoint.resolve() == self.latest_path.resolve():
                self.checkpointed = replace(self.progress)
        if self.context.is_main:
            self._remove_unfinished_writes()
        self.log = MetricsLog(
            self.output_dir,
            enabled=self.context.is_main,
            resume_step=self.progress.global_step if resume_payload is not None else None,
            tensorboard=config.Global.use_tensorboard,
        )
        self._stop_signal: int | None = None
        self._evaluating = False  # what a stop waits for: this evaluation, or this step
        self._previous_handlers: dict[int, Any] = {}
        self._stop_after_steps: int | None = None
        self._deadline: float | None = None

    # ----------------------------------------------------------------- set-up helpers
    def _build_model(self, pretrained: bool) -> RecModel:
        """The model Arch describes (`build_model`), with or without the backbone's
        pretrained weights, which are refused where they folded it."""
        model = build_model(self.config.Arch, pretrained=pretrained)
        if is_reparameterized(model):
            raise _folded_start(
                "Arch.Backbone.pretrained", self.config.Arch.Backbone.params["pretrained"]
            )
        return model

    def _load_pretrained_model(self) -> LoadReport:
        """Global.pretrained_model loaded into the model, what fits of it."""
        path = self.config.Global.pretrained_model
        with weight_file_setting("Global.pretrained_model"):
            report = load_weights(self.model, path, strict=False)
        if is_reparameterized(self.model):
            raise _folded_start("Global.pretrained_model", path)
        return report

    def _checkpoint_as_pretrained_model(self) -> str:
        """The override that starts a new run from the resumed checkpoint's weights."""
        return override_word(
            "Global.pretrained_model", resolve_checkpoint(self.config.Global.checkpoints)
        )

    def _warn_of_unused_pretrained_model(self, payload: dict[str, Any]) -> None:
        """A resume takes every weight from its checkpoint: a Global.pretrained_model given
        with it (other weights than the run started from) was dropped without a word. Not
        in a LinearProbe run's fine-tuning, whose pretrained_model is the probe's file."""
        given = self.config.Global.pretrained_model
        saved = (_saved_config(payload).get("Global") or {}).get("pretrained_model")
        if not given or given == saved or self.stage != RUN or not self.context.is_main:
            return
        logger.warning(
            "Global.pretrained_model %s is not used: a resumed run goes on from its "
            "checkpoint's weights; to start a new run from %s, leave out Global.checkpoints",
            given,
            given,
        )

    def _choose_seed(self, payload: dict[str, Any] | None) -> int:
        if payload is not None:
            seed = int(payload["seed"])
            asked = self.config.Global.seed
            if asked is not None and asked != seed and self.context.is_main:
                logger.warning(
                    "Global.seed %d is not used: a resumed run keeps its checkpoint's seed %d "
                    "(its batches and augmentation follow from it)",
                    asked,
                    seed,
                )
            return seed
        if self.config.Global.seed is not None:
            return self.config.Global.seed
        seed = torch.tensor(random.SystemRandom().randrange(1 << 31))
        if self.context.distributed:
            torch.distributed.broadcast(seed.to(self.context.device), src=0)
        return int(seed)

    def _scaled_learning_rate(self) -> float:
        lr = self.config.Optimizer.lr
        if lr.base_batch_size is None:
            return lr.learning_rate
        return lr.learning_rate * self.total_batch_size / lr.base_batch_size

    @property
    def total_batch_size(self) -> int:
        """Images per optimiser step, over all processes."""
        return self.train_loader.batch_sampler.batch_size * self.context.world_size

    def _restore(self, payload: dict[str, Any]) -> None:
        progress, steps = self.progress, self.steps_per_epoch
        # Older checkpoints do not record steps_per_epoch; their position must add up.
        saved = payload.get("steps_per_epoch")
        position_fits = progress.global_step == progress.epoch * steps + progress.batch_in_epoch
        if (saved is not None and saved != steps) or (saved is None and not position_fits):
            had = f"{saved} steps per epoch" if saved is not None else "another epoch length"
            # Photos added to the list since (the likeliest cause): its weights go on as well.
            raise ConfigError(
                f"Global.checkpoints: the run had {had}, this config gives {steps}; resume "
                "with the same training list, DataLoader.Train.sampler.batch_size and number "
                f"of processes, or start a new run from its weights with -o "
                f"{self._checkpoint_as_pretrained_model()}"
            )
        epochs = self.config.Global.epochs
        if progress.global_step > epochs * steps:  # it would "finish" without a step
            raise ConfigError(
                f"Global.epochs: the checkpoint is at step {progress.global_step}, past the "
                f"{epochs} epochs ({epochs * steps} steps) of this config; give at least "
                f"Global.epochs={math.ceil(progress.global_step / steps)}"
            )
        self._refuse_another_optimizer(payload)
        configured = [
            {key: value for key, value in group.items() if key not in ("params", "lr")}
            for group in self.optimizer.param_groups
        ]
        loss_state = {**payload.get("loss", {}), **self._own(payload, "loss_per_process")}
        try:
            self.model.load_state_dict(payload["model"])
            self.loss.load_state_dict(loss_state)
        except (RuntimeError, ValueError, KeyError) as exc:
            # torch's message lists every tensor (200 lines for another backbone): a count
            # and the first few of each kind, of the model's and of the loss's.
            misfits = [
                f"{what}: {', '.join(found)}"
                for what, module, state in (
                    ("model", self.model, payload.get("model", {})),
                    ("loss state", self.loss, loss_state),
                )
                if (found := fitting_tensors(module.state_dict(), state)[0].misfits())
            ]
            # The sections that shape the model's and the loss's tensors (XBM's memory), the
            # Arch's settings as they build it (`last_act: no` is its default, left out).
            saved, current = _saved_config(payload), self.config.model_dump(mode="json")
            if isinstance(saved.get("Arch"), dict):
                saved["Arch"] = weight_shaping_arch(saved["Arch"])
                current["Arch"] = weight_shaping_arch(current["Arch"])
            changed = [
                change
                for section in ("Arch", "Loss")
                if isinstance(saved.get(section), dict)
                for change in setting_differences(saved[section], current[section], section, "was")
            ]
            since = f"; changed since: {'; '.join(changed)}" if changed else ""
            # A new model (another backbone, a wider embedding) may start from the weights
            # that fit, as the other refusals of a resume offer.
            raise ConfigError(
                "Global.checkpoints: the checkpoint does not fit this config "
                f"({'; '.join(misfits) or exc}){since}; resume with the run's settings, or "
                "start a new run from its weights (those that fit) with -o "
                f"{self._checkpoint_as_pretrained_model()}"
            ) from None
        try:
            self.optimizer.load_state_dict(self._optimizer_state_for_these_groups(payload))
        except ValueError as exc:  # another number or size of parameter groups
            raise ConfigError(self._regrouped_parameters(payload, str(exc))) from None
        # load_state_dict brings back the checkpoint's settings (weight decay, lr_mult,
        # momentum, betas) with the state; the config given now is what the run continues with.
        for index, (group, settings) in enumerate(
            zip(self.optimizer.param_groups, configured, strict=True)
        ):
            changed = {k: (group.get(k), v) for k, v in settings.items() if group.get(k) != v}
            if changed:
                logger.warning(
                    "resuming parameter group %d with this config's %s instead of the checkpoint's",
                    index,
                    ", ".join(f"{k} {new} (was {old})" for k, (old, new) in changed.items()),
                )
                group.update(settings)
        self._warn_of_new_schedule(payload)
        self._warn_of_new_losses(payload)
        self._warn_of_other_batches(payload)
        if self.ema is not None:
            if "ema" not in payload:
                raise ConfigError(
                    "EMA: the checkpoint was trained without a weight average; resume it "
                    "without the EMA section"
                )
            self.ema.load_state_dict(payload["ema"])
            saved_decay = payload["ema"].get("decay")
            if saved_decay != self.ema.decay and self.context.is_main:
                logger.warning(
                    "resuming the weight average with this config's EMA.decay %s (was %s): "
                    "its steps from here on weigh as the new decay does",
                    self.ema.decay,
                    saved_decay,
                )
        elif "ema" in payload and self.context.is_main:
            logger.warning(
                "EMA: the checkpoint's weight average is dropped, this config has no EMA "
                "section (best and final weights will be the trained ones); resume with the "
                "section to keep it"
            )
        self.schedule.load_state_dict(payload["schedule"])
        self._forget_best_of_another_metric()
        load_scaler_state(self.scaler, payload["scaler"])
        restore_rng_state(self._own(payload, "rng"))

    def _own(self, payload: dict[str, Any], key: str) -> Any:
        """This process's entry of a checkpoint's per-process list (`_state`); the last
        process's for a process the run did not have, {} where the checkpoint has none."""
        entries = payload.get(key) or [{}]
        return entries[min(self.context.rank, len(entries) - 1)]

    def _refuse_another_optimizer(self, payload: dict[str, Any]) -> None:
        """Another kind of optimizer cannot take over the checkpoint's state (momentum
        buffers are no Adam moments): torch either fails on a missing key or drops the
        state without a word. Refuse by name instead; settings of the same kind carry over."""
        saved_name = (_saved_config(payload).get("Optimizer") or {}).get("name")
        saved_class = OPTIMIZER_CLASSES.get(saved_name)
        if saved_class is not None and type(self.optimizer) is not saved_class:
            raise ConfigError(
                f"Optimizer.name: the run was trained with {saved_name}, whose state "
                f"{self.config.Optimizer.name} cannot continue; resume with Optimizer.name="
                f"{saved_name}, or start a new run from its weights with -o "
                "Global.pretrained_model=..."
            )

    def _parameter_group_names(self) -> list[list[str]]:
        """Each optimizer group's parameters by name (`model.` or `loss.` and the name
        there), in the group's order: what a resume matches the saved state by."""
        names: dict[int, str] = {}
        for prefix, module in (("model", self.model), ("loss", self.loss)):
            for name, param in module.named_parameters():
                names.setdefault(id(param), f"{prefix}.{name}")
        return [
            [names[id(param)] for param in group["params"]] for group in self.optimizer.param_groups
        ]

    def _optimizer_state_for_these_groups(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's optimizer state, its groups in this optimizer's order. torch
        matches the state to the parameters by position, checking the groups' sizes only:
        a parameter moved to another group of the same size (a multiplier moved to a block
        of the same shape) took another's momentum without a word. The groups' parameter
        names are compared instead; the same groups in another order (a multiplier's new
        value sorts its group elsewhere) are put in this order. A checkpoint from before
        the names were recorded is compared by the grouping settings its config holds."""
        state: dict[str, Any] = payload["optimizer"]
        saved = payload.get("param_group_names")
        if saved is None:
            if self._grouping_changes(payload, regrouping=True):
                raise ConfigError(
                    self._regrouped_parameters(
                        payload, "the checkpoint records no parameter names to tell"
                    )
                )
            return state
        current = self._parameter_group_names()
        if saved == current:
            return state
        if sorted(saved) == sorted(current):
            groups = [state["param_groups"][saved.index(names)] for names in current]
            return {**state, "param_groups": groups}
        raise ConfigError(
            self._regrouped_parameters(payload, _regrouping(saved, state, current, self.optimizer))
        )

    def _grouping_changes(self, payload: dict[str, Any], regrouping: bool = False) -> list[str]:
        """The settings of `_PARAMETER_GROUPING` this config changes from the checkpoint's
        (those its config holds). `regrouping`: only those that change the groups, not an
        Optimizer.lr_mult of new values for the same modules that keeps them in their order
        (`_same_groups_of_multipliers`)."""
        saved, current = _saved_config(payload), self.config.model_dump(mode="json")
        return [
            f"{section}.{key} {current[section].get(key)} (was {saved[section][key]})"
            for section, key in _PARAMETER_GROUPING
            if isinstance(saved.get(section), dict)
            and key in saved[section]
            and saved[section][key] != current[section].get(key)
            and not (
                regrouping
                and key == "lr_mult"
                and _same_groups_of_multipliers(saved[section][key], current[section][key])
            )
        ]

    def _regrouped_parameters(self, payload: dict[str, Any], error: str) -> str:
        """Why the checkpoint's optimizer state does not fit: the settings that group the
        trainable parameters (by learning-rate multiplier and weight decay) must stay as
        the run had them, since the state belongs to the parameters as they were grouped."""
        changed = self._grouping_changes(payload)
        settings = ", ".join(f"{section}.{key}" for section, key in _PARAMETER_GROUPING)
        return (
            f"Global.checkpoints: the run's optimizer grouped the trainable parameters "
            f"otherwise ({error}); "
            + (f"changed since: {'; '.join(changed)}. " if changed else "")
            + f"Resume with the run's {settings}, or start a new run from its weights with "
            "-o Global.pretrained_model=..."
        )

    def _train_listing(self) -> str | None:
        """The training images' digest (`listing_digest`), where the dataset gives one."""
        return getattr(dataset_of(self.train_loader), "listing_digest", None)

    def _eval_listings(self) -> dict[str, str | None] | None:
        """The evaluation sets' digests (`listing_digest`) by section, None without an
        evaluation: what the best model's metric values were scored on."""
        if self.evaluation is None:
            return None
        loaders = {
            "DataLoader.Eval.Query": self.evaluation.query_loader,
            "DataLoader.Eval.Gallery": self.evaluation.gallery_loader,
        }
        return {
            where: getattr(dataset_of(loader), "listing_digest", None) if loader else None
            for where, loader in loaders.items()
        }

    def _warn_of_other_batches(self, payload: dict[str, Any]) -> None:
        """A resume draws the batches the run would have drawn only from the same images
        and sampler settings: other ones with as many steps per epoch (which are checked)
        go on, with a warning that the run is no longer the one it would have been. A
        setting written out at its default, or left out, is the same setting."""
        saved_listing = payload.get("train_listing")
        changes = []
        if saved_listing is not None and saved_listing != self._train_listing():
            changes.append("its images or their labels")
        saved_train = (_saved_config(payload).get("DataLoader") or {}).get("Train")
        saved_sampler = (saved_train or {}).get("sampler")
        current = self.config.model_dump(mode="json")["DataLoader"]["Train"].get("sampler")
        if saved_sampler is not None and settings_as_built(
            saved_sampler, registry.SAMPLERS
        ) != settings_as_built(current, registry.SAMPLERS):
            changes.append(f"DataLoader.Train.sampler {current} (was {saved_sampler})")
        # Other transforms (a resize added to images of several sizes, another crop) prepare
        # the images otherwise from here: said as other sampling is.
        saved_dataset = (saved_train or {}).get("dataset")
        if isinstance(saved_dataset, dict):  # a config without ops has none
            changes += _listed_changes(
                saved_dataset.get("transform_ops") or [],
                self.config.DataLoader.Train.dataset.params.get("transform_ops") or [],
                "DataLoader.Train.dataset.transform_ops",
                registry.TRANSFORMS,
                lambda params: ({}, dict(params or {})),
            )
        if changes and self.context.is_main:
            logger.warning(
                "resuming with other training data than the checkpoint's (%s): the run goes "
                "on from its step, but draws other batches than it would have",
                "; ".join(changes),
            )

    def _warn_of_new_schedule(self, payload: dict[str, Any]) -> None:
        """The learning-rate schedule is computed from the config, so a resumed run follows
        the config given now (its Global.epochs too: a longer run stretches a decay over
        the new length): say so where that differs from the checkpoint's. Settings are
        compared as the schedule takes them: one written out at its default is the one
        left out (which is shown as such)."""
        try:
            run = _saved_config(payload)
            saved_lr = settings_as_built(run["Optimizer"]["lr"], registry.LR_SCHEDULES)
            saved = {**saved_lr, "Global.epochs": run["Global"]["epochs"]}
        except (KeyError, TypeError):
            return  # an older checkpoint without its config
        current = {
            **settings_as_built(
                self.config.Optimizer.lr.model_dump(mode="json"), registry.LR_SCHEDULES
            ),
            "Global.epochs": self.config.Global.epochs,
        }
        changed = [
            f"{key} {current.get(key, AT_ITS_DEFAULT)} (was {saved.get(key, AT_ITS_DEFAULT)})"
            for key in dict.fromkeys([*current, *saved])
            if saved.get(key) != current.get(key)
        ]
        if changed and self.context.is_main:
            logger.warning(
                "resuming with this config's learning-rate schedule: %s", ", ".join(changed)
            )

    def _warn_of_new_losses(self, payload: dict[str, Any]) -> None:
        """A resumed run trains on the losses the config gives now: another weight or margin
        than the checkpoint's (an `-o` of the first command left out of the resume) went on
        without a word, where another schedule or optimizer setting is said. Compared as the
        losses take their settings, one written out at its default being the one left out.
        Losses whose state no longer fits are refused before (`_restore`)."""
        saved = (_saved_config(payload).get("Loss") or {}).get("Train")
        current = self.config.Loss.Train
        changed = _listed_changes(saved, current, "Loss.Train", registry.LOSSES, _loss_options)
        if changed and self.context.is_main:
            logger.warning("resuming with this config's losses: %s", "; ".join(changed))

    def _state(self) -> dict[str, Any]:
        """The checkpoint's content. Under DDP every process's RNG states and own loss state
        (XBM's memory of the batches it saw) are kept, each to resume with its own."""
        own = {"rng": capture_rng_state(), "loss": _on_cpu(self.loss.process_state())}
        processes: list[Any] = [own]
        if self.context.distributed:
            processes = [None] * self.context.world_size
            torch.distributed.all_gather_object(processes, own)
        rng = [process["rng"] for process in processes]
        return {
            "model": self.model.state_dict(),
            "loss": self.loss.state_dict(),
            **(
                {"loss_per_process": [process["loss"] for process in processes]}
                if self.context.distributed
                else {}
            ),
            "optimizer": self.optimizer.state_dict(),
            "param_group_names": self._parameter_group_names(),  # what the state belongs to
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "seed": self.seed,
            "steps_per_epoch": self.steps_per_epoch,  # a resume must keep the epoch's batches
            "train_listing": self._train_listing(),
            "eval_listings": self._eval_listings(),
            "config": json.dumps(self.config.model_dump(mode="json")),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def save_latest(self) -> None:
        state = self._state()  # collective under DDP: every rank takes part
        if self.context.is_main:
            save_training_state(self.latest_path, state, self.progress)
        self.checkpointed = replace(self.progress)  # every process: any may meet a bad image

    @property
    def latest_path(self) -> Path:
        """The run's training checkpoint in its output folder, which a resume is given."""
        return self.output_dir / f"{LATEST}{SUFFIX}"

    @property
    def result_model(self) -> nn.Module:
        """What evaluation sees and best/final weights hold: the weight average if `EMA` is
        set (`latest.pt` keeps the trained weights as well, for resuming)."""
        return self.ema.module if self.ema is not None else self.model

    def _save_weights(self, name: str) -> None:
        """The model's weights alone (`shitu eval`, `export`, `average` read them), synced
        to disk as `latest.pt` is, which names the best model's epoch."""
        if self.context.is_main:
            save_weights(
                self.result_model.state_dict(),
                self.output_dir / f"{name}.safetensors",
                model_metadata(self.result_model, self.config.Arch.model_dump(mode="json")),
                durable=True,
            )

    # ----------------------------------------------------------------- the loop
    def fit(
        self, stop_after_steps: int | None = None, time_limit_s: float | None = None
    ) -> FitResult:
        """Train to `Global.epochs`, or stop early (checkpointed) at a step or time limit."""
        self._stop_after_steps = stop_after_steps
        self._deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
        self._previous_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in STOPPING_SIGNALS
        }
        try:
            finished = self._run_epochs()
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            self.log.close()
            for loader in self._loaders():
                end_workers(loader)
        return FitResult(self.progress, finished, self.output_dir, self._stop_signal)

    def _loaders(self) -> list[DataLoader]:
        """The run's data loaders, the evaluation's included."""
        loaders = [self.train_loader]
        if self.evaluation is not None:
            loaders.append(self.evaluation.query_loader)
            if self.evaluation.gallery_loader is not None:
                loaders.append(self.evaluation.gallery_loader)
        return loaders

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """The first signal stops the run after the current step, or evaluation (which the
        message says: one can take minutes, which a stop 'after this step' did not explain),
        with a checkpoint; a second one acts as without this handler. A stage that is not
        resumed (the linear probe) says that the same command starts it over instead: its
        checkpoint was promised, then refused as a resume."""
        del frame
        leave_a_closed_terminal(signum)
        if self._stop_signal is not None:
            signal.signal(signum, self._previous_handlers[signum])
            signal.raise_signal(signum)
            return
        self._stop_signal = signum
        if self.context.is_main:
            # Stopped at once during an evaluation, a run keeps its epoch's training (see
            # `_evaluate`), which took longer than the evaluation most often.
            kept = self._evaluating and not self.context.distributed
            at_once = "the epoch's training is kept, not its evaluation" if kept else "without one"
            outcome = (
                f", with a checkpoint (send it again to stop at once, {at_once})"
                if self.stage.resumable
                else f" ({self.stage.name} is not resumed: the same command starts it over; "
                "send it again to stop at once)"
            )
            logger.warning(
                "%s: stopping after this %s%s",
                signal.Signals(signum).name,
                "evaluation" if self._evaluating else "step",
                outcome,
            )

    def _should_stop(self, before_step: bool = True) -> bool:
        """Whether to stop now. The step limit only holds back further steps: at an epoch's
        end (`before_step` False) the epoch is still evaluated and saved, and a limit at
        the run's last step finishes it. A signal or the time limit stops there too."""
        stop = self._stop_signal is not None
        stop |= (
            before_step
            and self._stop_after_steps is not None
            and self.progress.global_step >= self._stop_after_steps
        )
        stop |= self._deadline is not None and time.monotonic() >= self._deadline
        if self.context.distributed:  # every rank must stop at the same step
            flag = torch.tensor(float(stop), device=self.context.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def _run_epochs(self) -> bool:
        global_config = self.config.Global
        if self.progress.epoch >= global_config.epochs:
            # Nothing left to train (a finished run resumed with as many epochs): saved all
            # the same, as a run resumed into another folder had no checkpoint there to be
            # lengthened from (-o Global.epochs=MORE).
            self.save_latest()
        while self.progress.epoch < global_config.epochs:
            epoch = self.progress.epoch
            if not self._train_epoch():
                self.save_latest()
                return False
            if self.evaluation is not None and (epoch + 1) % global_config.eval_interval == 0:
                self._evaluate(epoch + 1)
            self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
            every = global_config.checkpoint_every_steps
            if (
                (epoch + 1) % global_config.save_interval == 0
                or epoch + 1 == global_config.epochs
                or (every and self.progress.global_step % every == 0)  # held back until now
            ):
                self.save_latest()
        self._save_weights(FINAL)  # runs without evaluation get weights too; soups use these
        barrier(self.context)
        return True

    def _train_epoch(self) -> bool:
        """One epoch from `progress.batch_in_epoch`; False if it stopped early."""
        config = self.config.Global
        epoch, start_batch = self.progress.epoch, self.progress.batch_in_epoch
        self.train_loader.batch_sampler.set_epoch(epoch, start_batch=start_batch)
        self.net.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=start_batch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not (self.shows_progress and self.context.is_main and sys.stderr.isatty()),
            unit="step",
            leave=False,
        )
        window_start, window_images = time.monotonic(), 0
        try:
            for images, labels, _ids, _indices in self.train_loader:
                if self._should_stop():
                    return False
                loss_value, parts = self._step(images, labels)
                self.progress.global_step += 1
                self.progress.batch_in_epoch += 1
                window_images += images.shape[0] * self.context.world_size
                bar.update(1)
                step = self.progress.global_step
                if step % config.print_batch_step == 0 or self.progress.batch_in_epoch == 1:
                    elapsed = max(time.monotonic() - window_start, 1e-9)
                    record = {
                        "epoch": epoch + 1,
                        "loss": loss_value,
                        **{k: float(all_reduce_mean(v, self.context)) for k, v in parts.items()},
                        "lr": self.schedule.lr_at(step - 1),  # before lr_mult
                        "images_per_s": round(window_images / elapsed, 2),
                    }
                    self.log.write("train", step, **record)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}")
                    if self.shows_progress and self.context.is_main and bar.disable:
                        self._print_step(record, step)
                    window_start, window_images = time.monotonic(), 0
                every = config.checkpoint_every_steps
                # An epoch's last step is saved after its evaluation (_run_epochs): a resume
                # from before it would evaluate, and log, that epoch again.
                if (
                    every
                    and step % every == 0
                    and self.progress.batch_in_epoch < self.steps_per_epoch
                ):
                    self.save_latest()
            return not self._should_stop(before_step=False)
        # An image that cannot be read, or of another size than the others (transform_ops
        # without a resize), met hours into the run: the steps done are kept.
        except (DataError, MixedImageSizes) as exc:
            kind = MixedImageSizes if isinstance(exc, MixedImageSizes) else DataError
            fix = "add that op" if kind is MixedImageSizes else "put the image right"
            # Nothing to keep: a stage that shitu train starts over, or a new run that met
            # it in its first batch (most often so with images of several sizes), whose
            # checkpoint of no step then only refused the same command as an earlier run.
            fresh = self.progress.global_step == 0 and self.config.Global.checkpoints is None
            if not self.stage.resumable or fresh:
                over = "" if self.stage.resumable else f" ({self.stage.name} starts over)"
                raise kind(
                    f"{raised_message(exc)}; {fix} and run the same command again{over}"
                ) from None
            latest = self.latest_path
            resume = override_word("Global.checkpoints", latest)
            if self.context.distributed:  # saving is collective: the other ranks are not here
                if self.checkpointed is None:
                    raise
                raise kind(
                    f"{raised_message(exc)}. The run's last checkpoint, of step "
                    f"{self.checkpointed.global_step}, is {latest}: {fix} and resume with "
                    f"-o {resume}"
                ) from None
            self.save_latest()
            steps = self.progress.global_step
            done = "1 step so far is" if steps == 1 else f"{steps} steps so far are"
            raise kind(
                f"{raised_message(exc)}. The run's {done} saved in {latest}: {fix} and resume "
                f"with -o {resume}"
            ) from None
        finally:
            bar.close()

    def _print_step(self, record: dict[str, Any], step: int) -> None:
        """A line on stderr for a logged step, where no bar is drawn (see `__init__`)."""
        print(
            f"epoch {record['epoch']}/{self.config.Global.epochs} step {step}: loss "
            f"{record['loss']:.4f}, lr {record['lr']:.2e}, {record['images_per_s']} images/s",
            file=sys.stderr,
            flush=True,
        )

    def _step(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, dict[str, torch.Tensor]]:
        lr = self.schedule.lr_at(self.progress.global_step)
        set_learning_rate(self.optimizer, lr)
        device = self.context.device
        images = images.to(device, non_blocking=True)
        if self.config.Global.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.as_tensor(labels).reshape(-1).to(device, non_blocking=True)
        with autocast_for(device, self.amp):
            outputs = self.net(images, labels)
        loss, parts = self.loss(outputs, labels)
        value = float(all_reduce_mean(loss.detach(), self.context))
        if not math.isfinite(value):
            raise self._diverged(
                f"the loss became {value} at step {self.progress.global_step + 1} (epoch "
                f"{self.progress.epoch + 1} of {self.stage.name})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.Optimizer.clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                self.config.Optimizer.clip_norm,
            )
        # A skipped step left the weights as they were: the average must not count them again.
        if scaled_step(self.scaler, self.optimizer) and self.ema is not None:
            self.ema.update()
        return value, parts

    def _diverged(self, problem: str) -> TrainingDiverged:
        """The error of a run whose training diverged (`problem`: a NaN or infinite loss,
        raised before its step's backward; or features an evaluation found NaN or
        infinite), its last checkpoint left as it was. Resuming is offered where a
        checkpoint of this run is there to resume (none before the first, none of a
        LinearProbe's probe, which `shitu train` starts over)."""
        latest = self.latest_path
        resume = ""
        if self.stage.resumable and latest.is_file():
            checkpoint = override_word("Global.checkpoints", latest)
            resume = f", and resume from its last checkpoint with -o {checkpoint}"
        return TrainingDiverged(
            f"{problem}; lower Optimizer.lr.learning_rate or set Optimizer.clip_norm{resume}"
        )

    def _forget_best_of_another_metric(self) -> None:
        """A run resumed with another Global.eval_metric would compare its values with the
        best of the old metric (a recall with an mAP): the best is chosen anew from here,
        and best_model.safetensors is replaced at the next evaluation."""
        progress, metric = self.progress, self.config.Global.eval_metric
        if progress.best_metric_name in (None, metric):
            return
        if self.context.is_main:
            logger.warning(
                "Global.eval_metric is %s, but the resumed run chose its best model (epoch "
                "%s) by %s: the best model is chosen by %s from the next evaluation on",
                metric,
                progress.best_epoch,
                progress.best_metric_name,
                metric,
            )
        self._forget_best()

    def _forget_best_of_other_evaluation_images(self, payload: dict[str, Any]) -> None:
        """A run resumed with other query or gallery images (a query list put right, say)
        scores on another scale: compared with the best of the old images, its values would
        seldom replace it (a harder set never), and the run's best would be an epoch scored
        on images no longer evaluated. The best is chosen anew from the next evaluation."""
        saved, current = payload.get("eval_listings"), self._eval_listings()
        if saved is None or current is None or self.progress.best_metric is None:
            return  # an older checkpoint, no evaluation now, or no best yet
        changed = [where for where in current if saved.get(where) != current[where]]
        if not changed:
            return
        if self.context.is_main:
            logger.warning(
                "resuming with other evaluation images than the checkpoint's (%s): its best "
                "model (epoch %s, %s %.4f) was scored on those, so the best model is chosen "
                "anew from the next evaluation",
                ", ".join(changed),
                self.progress.best_epoch,
                self.progress.best_metric_name,
                self.progress.best_metric,
            )
        self._forget_best()

    def _forget_best(self) -> None:
        """No best model yet, as far as this run knows; nor a best for a plateau schedule
        to compare the next evaluation with."""
        progress = self.progress
        progress.best_metric = progress.best_epoch = progress.best_metric_name = None
        self.schedule.forget_best()

    def _carry_over_from(self, run_dir: Path) -> None:
        """A run resumed into another folder than its checkpoint's would leave its earlier
        part's metrics log and best model behind, and name a best_model.safetensors that
        only a better evaluation writes there: copy both over, so that the folder holds the
        whole run. Without the best model's file (in either folder), the best is chosen
        anew."""
        best = run_dir / f"{BEST}.safetensors"
        if self.progress.best_metric is not None and not best.is_file():
            # Removed since (to save space, say): the run went on naming it as its best.
            if self.context.is_main:
                logger.warning(
                    "%s is gone, so the best model (epoch %s, %s %.4f) is chosen anew from "
                    "the next evaluation",
                    best,
                    self.progress.best_epoch,
                    self.progress.best_metric_name,
                    self.progress.best_metric,
                )
            self.progress.best_metric = self.progress.best_epoch = None
            self.progress.best_metric_name = None
        if run_dir.resolve() == self.output_dir.resolve() or not self.context.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        carried = [run_dir / LOG_NAME] + ([best] if self.progress.best_metric is not None else [])
        for source in carried:  # whole or not at all: a kill meanwhile leaves no half file
            if source.is_file():
                write_atomically(
                    self.output_dir / source.name, functools.partial(shutil.copyfile, source)
                )

    def _remove_unfinished_writes(self) -> None:
        """A run killed outright while it saved (SIGKILL when a SIGTERM's grace period ran
        out during the save) left that save's temporary file, a whole checkpoint's size,
        beside the file it kept: an earlier run's, as no other process writes the files of
        this run's folder."""
        remove_unfinished_writes(self.output_dir, RUN_FILES)

    def _save_unevaluated_epoch(self, epoch: int, ended: str) -> None:
        """After an evaluation that failed (out of memory, an unreadable eval image) or
        `ended` otherwise (stopped at once by a second signal, which lost the epoch's
        training, hours of it maybe, for an evaluation of minutes), checkpoint the epoch it
        evaluated as trained but not evaluated, as a stop at the epoch's end does: a
        resumed run evaluates it again instead of training it again. One process only:
        under DDP the other processes wait in the evaluation's collectives, where the
        checkpoint's own would not meet them."""
        if self.context.distributed:
            return
        self.save_latest()
        logger.warning(
            "the evaluation of epoch %d %s; its training is saved: resume with "
            "-o Global.checkpoints=%s to evaluate it and go on",
            epoch,
            ended,
            self.latest_path,
        )

    def _evaluate(self, epoch: int) -> None:
        assert self.evaluation is not None
        model = self.result_model
        if self.context.distributed:
            # Each rank's last forward updated its own BatchNorm statistics: evaluate (and
            # save) rank 0's, on every rank.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        self._evaluating = True
        try:
            result = self.evaluation.run(model)
        except NonFiniteFeatures as exc:
            if self.evaluation.amp == "fp16":  # float16 may have overflowed: the weights kept
                self._save_unevaluated_epoch(epoch, "failed")
                raise
            # Diverged weights: saved, they would replace the run's last checkpoint (the one
            # to go on from at a lower rate), and a resume would evaluate them to NaN again.
            raise self._diverged(f"evaluating epoch {epoch}: {exc}") from None
        except Exception:
            self._save_unevaluated_epoch(epoch, "failed")
            raise
        except (SystemExit, GeneratorExit):
            raise
        except BaseException:  # a second Ctrl-C or SIGTERM (KeyboardInterrupt, Terminated)
            self._save_unevaluated_epoch(epoch, "was stopped")
            raise
        finally:
            self._evaluating = False
        value = result.metrics[self.config.Global.eval_metric]
        self.schedule.observe(value)
        # With the counts the metrics average over: queries without a positive in the
        # gallery are left out of every metric, which a record alone did not tell.
        self.log.write(
            "eval",
            self.progress.global_step,
            epoch=epoch,
            **result.metrics,
            num_queries=result.num_queries,
            num_queries_without_positive=result.num_queries_without_positive,
        )
        if self.context.is_main:
            summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
            tqdm.write(f"epoch {epoch}: {summary}")
        if self.progress.best_metric is None or value > self.progress.best_metric:
            self.progress.best_metric, self.progress.best_epoch = value, epoch
            self.progress.best_metric_name = self.config.Global.eval_metric
            self._save_weights(BEST)


# How a message shows a setting left out, which takes its component's default.
AT_ITS_DEFAULT = "at its default"

# The settings that decide which parameters train and how the optimizer groups them.
_PARAMETER_GROUPING = (
    ("Arch", "frozen_layers"),
    ("Optimizer", "lr_mult"),
    ("Optimizer", "no_weight_decay_name"),
    ("Optimizer", "decay_norm_and_bias"),
)


def _same_groups_of_multipliers(saved: object, current: dict[str, float]) -> bool:
    """Whether Optimizer.lr_mult `current` groups the parameters as `saved` did: the same
    module names, their values (and the 1 of the others) mapped one to one onto the new
    ones in the same order, as the optimizer sorts its groups by multiplier."""
    if not isinstance(saved, dict) or saved.keys() != current.keys():
        return False
    pairs = sorted({(1.0, 1.0), *((saved[name], current[name]) for name in saved)})
    old, new = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    return len(set(old)) == len(set(new)) == len(pairs) and new == sorted(new)


def _regrouping(
    saved: list[list[str]],
    state: dict[str, Any],
    current: list[list[str]],
    optimizer: torch.optim.Optimizer,
) -> str:
    """The parameters whose group a resume would change: trained now but not then (or
    the other way round), or with another multiplier or with(out) weight decay; the
    first few, and how many more."""

    def kinds(names: list[list[str]], groups: list[dict[str, Any]]) -> dict[str, str]:
        return {
            name: f"lr_mult {group.get('lr_mult', 1.0)}, "
            + ("decayed" if group.get("weight_decay") else "not decayed")
            for group_names, group in zip(names, groups, strict=True)
            for name in group_names
        }

    before, now = kinds(saved, state["param_groups"]), kinds(current, optimizer.param_groups)
    changes = [
        f"{name} {now.get(name, 'frozen')} (was {before.get(name, 'frozen')})"
        for name in [*now, *(name for name in before if name not in now)]
        if now.get(name) != before.get(name)
    ]
    more = f"; and {len(changes) - 3} more" if len(changes) > 3 else ""
    return "; ".join(changes[:3]) + more


def _loss_options(params: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A loss item's settings of the sum (weight, input_key) not at their defaults, and the
    loss's own."""
    options, arguments = split_loss_params(params)
    return options.model_dump(exclude_defaults=True), arguments


def _listed_changes(
    saved: Any,
    current: list[dict[str, Any]],
    where: str,
    components: registry.Registry,
    options: Callable[[dict[str, Any] | None], tuple[dict[str, Any], dict[str, Any]]],
) -> list[str]:
    """How a list of `{Name: {params}}` items at `where` (Loss.Train, transform_ops) differs
    from a checkpoint's (`saved`, its config's): the names where the items are others, else
    each setting, compared as the components take them (one written out at its default is
    the one left out). `options` splits off settings of the list's own (the loss sum's).
    None where `saved` is not such a list (another version's checkpoint)."""

    def by_item(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        settings = {}
        for index, item in enumerate(items):
            ((name, params),) = item.items()
            own, arguments = options(params)
            given = settings_as_built({"name": name, **arguments}, components)
            settings[f"{index}.{name}"] = {**own, **{k: v for k, v in given.items() if k != "name"}}
        return settings

    try:
        before = by_item(saved)
    except (ConfigError, ValueError, TypeError, AttributeError):
        return []  # not a list of items as this version writes them
    after = by_item(current)
    if list(before) != list(after):
        names = [[key.split(".", 1)[1] for key in items] for items in (after, before)]
        return [f"{where} {', '.join(names[0])} (was {', '.join(names[1])})"]
    return setting_differences(before, after, where, "was")


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s tensors on the CPU, to gather from other processes (a GPU tensor would be
    unpickled onto the sender's device index)."""
    return {key: tensor.cpu() for key, tensor in state.items()}


def _saved_config(payload: dict[str, Any]) -> dict[str, Any]:
    """The config a checkpoint was trained with; empty for older checkpoints without it."""
    try:
        config = json.loads(payload["config"])
    except (KeyError, TypeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _check_class_count(config: ShituConfig, dataset: Any, warn: bool) -> None:
    """A classifier smaller than the labels fails only when such a label is first drawn,
    with an index error (a device-side assert on a GPU): say so before the first step,
    naming the listing. One larger than the classes (a copied config's class_num left as
    it was) trains, but its extra outputs are never a label: warned of. A dataset that
    numbers its own classes (a folder per class, class names) counts them; bare class ids
    may leave gaps below the largest, so only the outputs above it are counted."""
    head = config.Arch.Head
    labels = getattr(dataset, "labels", None)
    if head is None or not labels:
        return
    # Typed as the head was built with it: `class_num: 81.0` (or 1e3) is a whole number.
    class_num = registry.HEADS.validate(head.name, head.params).get("class_num")
    if not isinstance(class_num, int):
        return
    listing = f"DataLoader.Train's {getattr(dataset, 'where', 'dataset')}"
    largest = max(labels)
    # The labels it numbers (class names, relabelled ids), not the listed ones.
    keys = getattr(dataset, "label_keys", None)
    if largest >= class_num:
        numbered = f" (its {len(keys)} classes numbered from 0)" if keys else ""
        # Class ids with gaps (product codes, a subset of a larger listing): a classifier
        # of largest + 1 outputs, most never a label, was the only advice.
        distinct = len(set(labels))
        relabel = (
            f", or DataLoader.Train.dataset.relabel: true to number its {distinct} classes from 0"
            if getattr(dataset, "relabel", None) is False and distinct <= largest
            else ""
        )
        raise ConfigError(
            f"Arch.Head.class_num is {class_num}, but {listing} has labels up to "
            f"{largest}{numbered}; set Arch.Head.class_num: {largest + 1}{relabel}"
        )
    # The classes it numbers, or those a Grocery listing's classes.csv names.
    classes = keys or getattr(dataset, "class_names", None)
    used = len(classes) if classes is not None else largest + 1
    if warn and class_num > used:
        logger.warning(
            "Arch.Head.class_num is %d, but %s has %s: the other %d outputs of the "
            "classifier are never a label; set Arch.Head.class_num: %d",
            class_num,
            listing,
            f"{used} classes" if classes is not None else f"labels up to {largest}",
            class_num - used,
            used,
        )


def _warn_of_one_class(dataset: Any) -> None:
    """A training set of one class (a label column read wrong, a script that wrote one
    label for all) has no classes to tell apart: cross-entropy over one class is 0 and a
    metric loss finds no negative, so the run learnt nothing, without a word (a PKSampler
    refuses it; other samplers took it)."""
    labels = getattr(dataset, "labels", None)
    if not labels or len(set(labels)) > 1:
        return
    keys = getattr(dataset, "label_keys", None) or getattr(dataset, "class_names", None)
    label = keys[labels[0]] if keys is not None and labels[0] < len(keys) else labels[0]
    logger.warning(
        "DataLoader.Train's %s: all %d images have one label (%s), so there are no classes "
        "to tell apart and the losses on labels learn nothing; check the labels",
        getattr(dataset, "where", "dataset"),
        len(labels),
        label,
    )


def _warn_of_trained_queries(train: Any, queries: Any) -> None:
    """Query images the run trains on (the training list given as the query set, or lists
    that overlap) score the model on what it learnt, above what it does on new photos:
    the metrics and the best model chosen by them said nothing of it."""
    # A set of the query paths (the fewer, most often); the training list is read once.
    queried = [os.path.abspath(path) for path in queries.paths]
    listed = set(queried)
    trained = {key for path in train.paths if (key := os.path.abspath(path)) in listed}
    shared = [path for path, key in zip(queries.paths, queried, strict=True) if key in trained]
    if shared:
        logger.warning(
            "%d of %d query images are training images too (%s%s): the metrics then tell "
            "how well the model knows photos it trains on, not how it does on new ones; "
            "query with photos kept out of training",
            len(shared),
            len(queries),
            shared[0],
            ", ..." if len(shared) > 1 else "",
        )


def _check_scores_of_other_outputs(loss: CombinedLoss, model: RecModel, dataset: Any) -> None:
    """A cross-entropy set to read another output than the head's logits (as the advice for
    a model without a head offers) takes its values for class scores: one narrower than
    the labels failed when such a label was first drawn, with torch's "Target 68 is out of
    bounds", maybe an epoch in. `_check_class_count` checks the head's logits."""
    labels = getattr(dataset, "labels", None)
    reading = [
        (name, key)
        for name, key, part in zip(loss.names, loss.input_keys, loss.losses, strict=True)
        if key != "logits" and getattr(part, "reads_class_scores", False)
    ]
    if not labels or not reading:
        return
    largest = max(labels)
    outputs = one_image_outputs(model)
    for name, key in reading:
        width = outputs[key].shape[1]
        if largest >= width:
            listing = f"DataLoader.Train's {getattr(dataset, 'where', 'dataset')}"
            advice = (
                f"leave out {name}.input_key to read the head's 'logits'"
                if "logits" in model.output_keys
                else f"give the model an Arch.Head with class_num: {largest + 1}, whose "
                f"'logits' {name} reads by default"
            )
            raise ConfigError(
                f"Loss.Train: {name} reads '{key}' ({width} values per image) as class scores, "
                f"but {listing} has labels up to {largest}; {advice}"
            )


def _memories(loss: CombinedLoss) -> list[tuple[str, CrossBatchMemory]]:
    """The loss's cross-batch memory terms (XBM), by their names in Loss.Train."""
    return [
        (name, part)
        for name, part in zip(loss.names, loss.losses, strict=True)
        if isinstance(part, CrossBatchMemory)
    ]


def _warn_of_unused_memory(
    loss: CombinedLoss, steps_per_epoch: int, epochs: int, stage: Stage
) -> None:
    """XBM's memory joins the loss only after `start_iter` steps: a run that ends first (a
    recipe's 1,000 on a smaller dataset) trains on the in-batch pairs alone, without a
    word."""
    total = steps_per_epoch * epochs
    for name, part in _memories(loss):
        if part.start_iter >= total:
            logger.warning(
                "Loss.Train %s: start_iter %d is not before the end of %s (%d steps: %d "
                "epochs of %d, %s), so its cross-batch memory is never used; lower start_iter",
                name,
                part.start_iter,
                stage.name,
                total,
                epochs,
                steps_per_epoch,
                stage.epochs_key,
            )


def _check_memory_holds_past_batches(loss: CombinedLoss, batch_size: int) -> None:
    """XBM writes each batch into its memory before comparing the batch with it: a memory
    of no more than one batch holds the batch itself alone, never a past one, and its term
    only repeated the in-batch pairs, without a word."""
    for name, part in _memories(loss):
        if part.memory_size <= batch_size:
            raise ConfigError(
                f"Loss.Train: {name}.{part.memory_key} is {part.memory_size}, no more than "
                f"one batch (DataLoader.Train.sampler.batch_size {batch_size}), so the memory "
                "would hold only the batch it is compared with, never a past one; give "
                f"{part.memory_key} room for many batches, or lower batch_size"
            )


def _warn_of_memory_above_the_images(loss: CombinedLoss, images: int) -> None:
    """An XBM memory larger than the training set (a recipe's 55,000 on a smaller one)
    holds images more than once: older embeddings of a batch's own images then count as
    their positives, and each batch is compared with every copy, without a word."""
    for name, part in _memories(loss):
        if part.memory_size > images:
            logger.warning(
                "Loss.Train %s: %s %d is more than the %d training images, so the memory "
                "holds images more than once, older embeddings of a batch's own images "
                "among their positives; give %s %d or less",
                name,
                part.memory_key,
                part.memory_size,
                images,
                part.memory_key,
                images,
            )


def _warn_of_a_batch_above_the_images(sampler: Any, scaled: bool) -> None:
    """A batch_size above the images a process has (without drop_last, which refuses it)
    gives batches of those images alone: the run's summary showed the batch size it never
    reaches, and where Optimizer.lr.base_batch_size is given (`scaled`) the learning rate
    was scaled for it."""
    per_process, size = getattr(sampler, "num_samples", None), sampler.batch_size
    if per_process is None or per_process >= size:
        return
    rate = f" (and Optimizer.lr.base_batch_size scales the learning rate for {size})"
    logger.warning(
        "DataLoader.Train.sampler: batch_size %d is more than the %d training images (per "
        "process), so each batch holds those %d%s; set batch_size: %d",
        size,
        per_process,
        per_process,
        rate if scaled else "",
        per_process,
    )


def _check_last_batch(sampler: Any, model: nn.Module, dataset: Any) -> None:
    """A BatchNorm that trains on one value per channel (see `shitu.engine.batch_norm`)
    is refused up front where every batch is of one image (batch_size 1, which raised at
    the first step) or, without drop_last, an epoch ends on one (which raised mid-run,
    after a whole epoch of work)."""
    per_process, size = getattr(sampler, "num_samples", None), sampler.batch_size
    ends_on_one = per_process is not None and not sampler.drop_last and per_process % size == 1
    if size != 1 and not ends_on_one:
        return
    with torch.random.fork_rng(devices=[]):  # the sample's augmentation draws leave no trace
        image = dataset[0][0]
    found = norm_on_one_value_per_channel(model, image)
    if found is None:
        return
    _, height, width = image.shape
    where = found.describe(width, height)
    if size == 1:
        larger = " (or train on larger images)" if found.on_feature_map else ""
        raise ConfigError(
            f"DataLoader.Train.sampler: batch_size 1 gives batches of 1 image, on which "
            f"{where}, and BatchNorm cannot train on that; give a batch_size of 2 or more"
            f"{larger}"
        )
    raise ConfigError(
        f"DataLoader.Train: each epoch would end on a batch of 1 image ({per_process} per "
        f"process, batch_size {size}), on which {where}, and BatchNorm cannot train on that; "
        "set sampler.drop_last: true or another batch_size"
    )


def _folded_start(setting: str, path: object) -> CheckpointError:
    """The refusal of folded weights (an export's, `shitu convert --reparameterize`'s) as a
    run's start: loading them folded the model, which then trained without the parallel
    branches folding merged away, unsaid, and whose checkpoint no resume could load (a
    resume builds the model unfolded)."""
    return CheckpointError(
        f"{setting}: {path} holds folded (re-parameterised) weights, an export's, for "
        "inference: a run from them would train the backbone without its parallel "
        "branches; give the weights they were folded from (a run's "
        "best_model.safetensors, say)"
    )


def training_summary(trainer: Trainer) -> dict[str, Any]:
    """What a user wants to see before a long run starts."""
    dataset = dataset_of(trainer.train_loader)
    return {
        "device": str(trainer.context.device),
        "processes": trainer.context.world_size,
        "train images": len(dataset),
        "classes": len(set(dataset.labels)),  # in the training list, not the label map's
        # Only these: "skipped images: 0" was false where a folder scan left images out (one
        # beside the label folders, a .gif), with a warning of its own.
        "images left out by skip_corrupt": len(getattr(dataset, "skipped", [])),
        "batch size per process": trainer.train_loader.batch_sampler.batch_size,
        "steps per epoch": trainer.steps_per_epoch,
        "learning rate": _learning_rate_shown(trainer),
        "seed": trainer.seed,
        "initial weights": trainer.initial_weights,
        "weight average (EMA) decay": trainer.ema.decay if trainer.ema is not None else "off",
        "output": str(trainer.output_dir),
    }


def _learning_rate_shown(trainer: Trainer) -> str:
    """The rate the run starts from, and where it was scaled for the batch size, from what:
    `learning_rate: 0.03` showed as 0.0075, unexplained, for a batch of 8."""
    lr = trainer.config.Optimizer.lr
    if lr.base_batch_size is None or trainer.learning_rate == lr.learning_rate:
        return f"{trainer.learning_rate:g}"
    return (
        f"{trainer.learning_rate:g} (Optimizer.lr.learning_rate {lr.learning_rate:g} for "
        f"base_batch_size {lr.base_batch_size}, scaled to the batch of {trainer.total_batch_size})"
    )
