"""Learning-rate schedules, evaluated per iteration, registered in `LR_SCHEDULES`.

Every schedule has an optional linear warm-up over `warmup_epoch` epochs from
`warmup_start_lr`; the learning rate is a pure function of the global step
(plus, for ReduceOnPlateau, the eval history kept in `state_dict`), so resuming
a run recomputes exactly the same values.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from shitu.registry import LR_SCHEDULES

# A rate a schedule reaches (a start, a floor, a piece): below 0 the optimizer would climb
# the loss instead of descending it, without an error.
Rate = Annotated[float, Field(ge=0)]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """The training a schedule paces, as messages name it: a LinearProbe run's probe has
    epochs of its own, which "the run" would confuse with Global.epochs, and a checkpoint
    that is not resumed (`shitu train` starts the probe over)."""

    name: str
    epochs_key: str
    resumable: bool = True


RUN = Stage("the run", "Global.epochs")


class LRSchedule:
    """Base: warm-up, then `decayed(step)` for the steps after it."""

    # Whether the rate follows `observe`d evaluations, which a config must then run.
    needs_evaluation: ClassVar[bool] = False

    def __init__(
        self,
        learning_rate: float,
        steps_per_epoch: int,
        epochs: int,
        warmup_epoch: int = 0,
        warmup_start_lr: Rate = 0.0,
        stage: Stage = RUN,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be at least 1")
        self.learning_rate = learning_rate
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = min(warmup_epoch * steps_per_epoch, self.total_steps)
        self.warmup_start_lr = warmup_start_lr
        if self.warmup_steps:
            _warn_if_above_the_rate(
                "warmup_start_lr",
                warmup_start_lr,
                learning_rate,
                "the warm-up lowers the rate instead of raising it",
            )
        if warmup_epoch >= epochs:  # e.g. a short trial, or a probe
            logger.warning(
                "a warm-up of %d epoch%s is not shorter than %s's %d (%s): the learning rate "
                "never reaches its full %g",
                warmup_epoch,
                "" if warmup_epoch == 1 else "s",
                stage.name,
                epochs,
                stage.epochs_key,
                learning_rate,
            )

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            fraction = step / self.warmup_steps
            return self.warmup_start_lr + fraction * (self.learning_rate - self.warmup_start_lr)
        return self.decayed(step)

    def decayed(self, step: int) -> float:
        return self.learning_rate

    def observe(self, metric: float) -> None:
        """Called with the tracked eval metric after each evaluation (used by plateau)."""

    def forget_best(self) -> None:
        """Compare the next `observe`d value with none before it: a resumed run's metric,
        or the images it is scored on, changed (used by plateau)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


@LR_SCHEDULES.register("Constant")
class Constant(LRSchedule):
    """The same rate after warm-up."""


@LR_SCHEDULES.register("Cosine")
class Cosine(LRSchedule):
    """Half-cosine from `learning_rate` down to `eta_min` over the steps after warm-up."""

    def __init__(
        self,
        learning_rate: float,
        steps_per_epoch: int,
        epochs: int,
        warmup_epoch: int = 0,
        warmup_start_lr: Rate = 0.0,
        eta_min: Rate = 0.0,
        stage: Stage = RUN,
    ) -> None:
        super().__init__(
            learning_rate, steps_per_epoch, epochs, warmup_epoch, warmup_start_lr, stage
        )
        self.eta_min = eta_min
        # the same in every stage, so said once
        _warn_if_above_the_rate(
            "Cosine: eta_min", eta_min, learning_rate, "the rate rises instead of decaying"
        )

    def decayed(self, step: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.eta_min + 0.5 * (self.learning_rate - self.eta_min) * (
            1.0 + math.cos(math.pi * progress)
        )


@LR_SCHEDULES.register("Piecewise")
class Piecewise(LRSchedule):
    """Step decay at the given epochs: explicit `values`, or multiply by `gamma` each time.

    `values` are the rates of the pieces for the configured `learning_rate`, which equals
    the first (the config checks it); a rate scaled for the batch size scales them all.
    The decay epochs count from the end of the warm-up, as in PaddleClas (whose warm-up
    wraps the schedule and starts it afterwards).
    """

    def __init__(
        self,
        learning_rate: float,
        steps_per_epoch: int,
        epochs: int,
        decay_epochs: list[Annotated[int, Field(ge=0)]],
        values: list[Rate] | None = None,
        gamma: Annotated[float, Field(gt=0)] = 0.1,
        warmup_epoch: int = 0,
        warmup_start_lr: Rate = 0.0,
        stage: Stage = RUN,
    ) -> None:
        super().__init__(
            learning_rate, steps_per_epoch, epochs, warmup_epoch, warmup_start_lr, stage
        )
        self.check_params(decay_epochs, values)
        if values is None:
            source = f"its gamma {gamma:g} has"
            values = [learning_rate * gamma**i for i in range(len(decay_epochs) + 1)]
        else:
            source = "its values have"
            values = [value * (learning_rate / values[0]) for value in values]
        # A gamma of 10 for 0.1 multiplied the rate at each step until the loss was NaN.
        rising = [
            epoch
            for epoch, (before, after) in zip(decay_epochs, itertools.pairwise(values), strict=True)
            if after > before
        ]
        if rising:
            logger.warning(
                "Piecewise: the rate rises at decay epoch%s %s, as %s it, instead of "
                "decaying; give a gamma below 1 (or falling values)",
                "s" if len(rising) > 1 else "",
                ", ".join(map(str, rising)),
                source,
            )
        reached = epochs - warmup_epoch
        unreached = [epoch for epoch in decay_epochs if epoch >= reached]
        if unreached:  # e.g. a short trial, or a probe
            # Each one named: the last alone hid that the rate never decays at all.
            logger.warning(
                "Piecewise: decay epoch%s %s not reached in %s (decay epochs count after "
                "the %d warm-up epochs, leaving %d of its %d (%s))%s",
                "s" if len(unreached) > 1 else "",
                f"{', '.join(map(str, unreached))} {'are' if len(unreached) > 1 else 'is'}",
                stage.name,
                warmup_epoch,
                reached,
                epochs,
                stage.epochs_key,
                ": the rate never decays" if len(unreached) == len(decay_epochs) else "",
            )
        self.boundaries = [epoch * steps_per_epoch for epoch in decay_epochs]
        self.values = list(values)

    @staticmethod
    def check_params(
        decay_epochs: list[int], values: list[float] | None = None, **_others: Any
    ) -> None:
        """Also checked as a config loads (by the registry), naming the file and key."""
        # An epoch twice ([30, 30]) would skip the piece between them without a word.
        if any(later <= earlier for earlier, later in itertools.pairwise(decay_epochs)):
            raise ValueError(f"decay_epochs: {decay_epochs} must be increasing, each epoch once")
        if values is not None and len(values) != len(decay_epochs) + 1:
            raise ValueError(
                f"values: needs one more entry than decay_epochs ({len(decay_epochs) + 1}), "
                f"got {len(values)}"
            )

    def decayed(self, step: int) -> float:
        after_warmup = step - self.warmup_steps
        return self.values[sum(after_warmup >= boundary for boundary in self.boundaries)]


@LR_SCHEDULES.register("ReduceOnPlateau")
class ReduceOnPlateau(LRSchedule):
    """Multiply the rate by `factor` when the eval metric has not improved for `patience` evals.

    `mode` is read for PaddleClas's configs, and only `max` is taken (`check_params`)."""

    needs_evaluation = True

    def __init__(
        self,
        learning_rate: float,
        steps_per_epoch: int,
        epochs: int,
        factor: Annotated[float, Field(gt=0, lt=1)] = 0.1,
        patience: Annotated[int, Field(ge=0)] = 3,
        mode: Literal["max", "min"] = "max",
        threshold: Annotated[float, Field(ge=0)] = 1e-4,
        min_lr: Rate = 0.0,
        warmup_epoch: int = 0,
        warmup_start_lr: Rate = 0.0,
        stage: Stage = RUN,
    ) -> None:
        super().__init__(
            learning_rate, steps_per_epoch, epochs, warmup_epoch, warmup_start_lr, stage
        )
        self.check_params(mode=mode)
        self.factor, self.patience = factor, patience
        self.threshold, self.min_lr = threshold, min_lr
        _warn_if_above_the_rate(
            "ReduceOnPlateau: min_lr",
            min_lr,
            learning_rate,
            "a plateau raises the rate instead of lowering it",
        )
        self.current = learning_rate
        self.best: float | None = None
        self.bad_evals = 0

    @staticmethod
    def check_params(mode: str = "max", **_others: Any) -> None:
        """Also checked as a config loads (by the registry). The rate follows
        Global.eval_metric, and every metric an evaluation gives is better higher: `min`
        (PaddleClas's default, for a loss) would lower the rate as the metric improves."""
        if mode != "max":
            raise ValueError(
                f"mode: {mode} lowers the rate while Global.eval_metric improves (recall@K, "
                "precision@K, mAP and mINP are better higher); use max"
            )

    def decayed(self, step: int) -> float:
        return self.current

    def observe(self, metric: float) -> None:
        if self.best is None or metric - self.best > self.threshold * abs(self.best):
            self.best, self.bad_evals = metric, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.patience:
            self.current = max(self.min_lr, self.current * self.factor)
            self.bad_evals = 0

    def forget_best(self) -> None:
        self.best, self.bad_evals = None, 0  # the rate reached so far stays

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "learning_rate": self.learning_rate,  # what `current` was reduced from
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The state of a run resumed with another learning rate applies the reductions
        so far to the new rate (a resume follows the config's rate, and says so); kept
        above min_lr as reductions are. A state without its rate (an older checkpoint)
        keeps its current rate."""
        self.current, self.best, self.bad_evals = (
            state["current"],
            state["best"],
            state["bad_evals"],
        )
        saved = state.get("learning_rate")
        if saved and saved != self.learning_rate:
            self.current *= self.learning_rate / saved
            if state["current"] < saved:  # reduced: as far as min_lr at most
                self.current = max(self.min_lr, self.current)


def _warn_if_above_the_rate(setting: str, value: float, learning_rate: float, effect: str) -> None:
    """Warn where a schedule's bound `setting` is above the learning rate as scaled for the
    batch size (a rate scaled down for a smaller batch can fall below it); `effect`: what
    the schedule then does instead."""
    if value > learning_rate:
        logger.warning(
            "%s %g is above the learning rate %g (as scaled for the batch size, where "
            "base_batch_size is set), so %s",
            setting,
            value,
            learning_rate,
            effect,
        )
