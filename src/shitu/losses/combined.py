"""The weighted sum of the losses listed in a config's `Loss.Train`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from shitu.errors import ConfigError
from shitu.models.rec_model import one_image_outputs
from shitu.registry import LOSSES, format_validation_error

if TYPE_CHECKING:
    from shitu.models.rec_model import RecModel

# Keys of a loss item that belong to the combiner, not to the loss's constructor
# (`feature_from` is PaddleClas's name for `input_key`).
COMBINER_KEYS = ("weight", "input_key", "feature_from")


class CombinerOptions(BaseModel):
    """How the sum takes one loss: its weight (0 leaves it out; a negative weight would
    maximise it) and the model output it reads (default: the one its class declares)."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    input_key: Literal["features", "logits", "backbone", "neck"] | None = None


def split_loss_params(params: dict[str, Any] | None) -> tuple[CombinerOptions, dict[str, Any]]:
    """(combiner options, constructor arguments) of one `{LossName: params}` item; a
    combiner option the sum cannot use is a ConfigError naming the key."""
    params = dict(params or {})
    options = {key: params.pop(key) for key in COMBINER_KEYS if key in params}
    if "feature_from" in options:
        feature_from = options.pop("feature_from")
        if options.setdefault("input_key", feature_from) != feature_from:
            raise ConfigError(
                f"feature_from: {feature_from!r} and input_key {options['input_key']!r} are "
                "one setting (feature_from is PaddleClas's name for it); give one"
            )
    try:
        return CombinerOptions.model_validate(options), params
    except ValidationError as exc:
        message = format_validation_error(exc, CombinerOptions, "the loss sum")
        raise ConfigError(message) from None


class CombinedLoss(nn.Module):
    """sum_i weight_i * loss_i(outputs[input_key_i], labels).

    Each loss reads the model output its class declares (`input_key`: logits for
    cross-entropy, features for metric losses) unless the item sets `input_key`.
    Stateful losses (XBM's memory) are sub-modules, so their state is checkpointed.
    """

    def __init__(self, items: list[dict[str, dict[str, Any] | None]]) -> None:
        super().__init__()
        if not items:
            raise ValueError("Loss.Train needs at least one loss")
        self.names: list[str] = []
        self.weights: list[float] = []
        self.input_keys: list[str] = []
        self.losses = nn.ModuleList()
        for item in items:
            ((name, params),) = item.items()
            options, ctor_params = split_loss_params(params)
            loss = LOSSES.build(name, **ctor_params)
            self.names.append(name)
            self.weights.append(options.weight)
            self.input_keys.append(options.input_key or getattr(loss, "input_key", "features"))
            self.losses.append(loss)

    def attach(self, model: RecModel) -> None:
        """Check that `model` gives every output a loss reads, of the width the loss takes
        (`check_input`, e.g. XBM's memory), before the first step; give losses that read
        the model itself (feature distillation) the model, once its starting weights are
        loaded."""
        for name, key in zip(self.names, self.input_keys, strict=True):
            if key not in model.output_keys:
                # Only the neck's and the head's outputs can be missing: name the section
                # that gives the one read (an Arch.Head gives no 'neck').
                section = "Arch.Neck" if key == "neck" else "Arch.Head"
                raise ConfigError(
                    f"Loss.Train: {name} reads model output '{key}', which this model does "
                    f"not produce (it gives {', '.join(model.output_keys)}); add an {section} "
                    f"or set {name}.input_key"
                )
        self._check_something_trains(model)
        checked = [
            (key, loss)
            for key, loss in zip(self.input_keys, self.losses, strict=True)
            if hasattr(loss, "check_input")
        ]
        outputs = one_image_outputs(model) if checked else {}
        for key, loss in checked:
            try:
                loss.check_input(outputs[key].float())
            except ConfigError as exc:
                raise ConfigError(f"Loss.Train: {exc}") from None
        for loss in self.losses:
            if hasattr(loss, "attach"):
                try:
                    loss.attach(model)
                except ConfigError as exc:
                    raise ConfigError(f"Loss.Train: {exc}") from None

    def _check_something_trains(self, model: RecModel) -> None:
        """Refuse losses that each read an output of frozen layers only (a metric loss on
        the features of a frozen backbone and neck, the head alone trainable): the first
        step failed with torch's "element 0 of tensors does not require grad". Where nothing
        at all trains, the optimizer says so instead."""
        if not any(p.requires_grad for p in [*model.parameters(), *self.parameters()]):
            return
        parts = zip(self.names, self.weights, self.input_keys, self.losses, strict=True)
        read = []
        for name, weight, key, loss in parts:
            if not weight:
                continue
            if model.trains_output(key) or any(p.requires_grad for p in loss.parameters()):
                return
            read.append(f"{name} reads '{key}'")
        raise ConfigError(
            f"Loss.Train: every loss reads an output of frozen layers only ({'; '.join(read)}), "
            "so nothing would be learnt: Arch.frozen_layers (and in a LinearProbe run's probe "
            "LinearProbe.frozen_layers) freeze every layer it comes through; add a loss on "
            "an output of a trained layer (a head's 'logits', say), or freeze fewer layers"
        )

    def process_state(self) -> dict[str, torch.Tensor]:
        """The part of `state_dict` that each DDP process holds for itself (XBM's memory of
        the batches that process saw: `per_process_state` losses), which a checkpoint keeps
        for every process."""
        return {
            f"{name}.{key}": value
            for name, module in self.named_modules()
            if getattr(module, "per_process_state", False)
            for key, value in module.state_dict().items()
        }

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and each loss's (unweighted) value, keyed by loss name.

        Computed in float32 also where it is called under autocast (as PyTorch's AMP recipe
        has it): a bf16 matmul rounds cosine similarities near 1 in steps of 0.004, coarser
        than the margins and thresholds the pair losses compare them with.
        """
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        device = next(iter(outputs.values())).device.type
        with torch.autocast(device, enabled=False):
            for name, weight, key, loss in zip(
                self.names, self.weights, self.input_keys, self.losses, strict=True
            ):
                value = loss(outputs[key].float(), labels)
                parts[name if name not in parts else f"{name}_{len(parts)}"] = value.detach()
                total = weight * value if total is None else total + weight * value
        assert total is not None
        return total, parts
