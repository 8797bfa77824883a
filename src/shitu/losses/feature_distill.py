"""Feature distillation towards the backbone a run started from (learning without forgetting).

Fine-tuning on one domain wears away features that served others (the default model's
drawn road signs lose 0.12-0.20 of recall@1 against its ImageNet start). This term pulls
the trained backbone's features towards those a frozen copy of its starting weights gives
the same augmented batch, so what the start knew is kept where the new data does not
need it to change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shitu.errors import ConfigError
from shitu.registry import LOSSES


@LOSSES.register("FeatureDistillLoss")
class FeatureDistillLoss(nn.Module):
    """mean over the batch of ||s/|s| - t/|t|||^2 (= 2 - 2 cos(s, t)).

    s: the backbone's output, or the output of its sub-module `layer` (e.g. `flatten`, the
    pooled features before an embedding layer); t: the same from the frozen copy of the
    backbone made by `attach` (the Trainer calls it once the starting weights are loaded).
    The copy runs as the trained backbone does, so that at step 0 s equals t: its modules
    in eval mode (no stochastic depth) except BatchNorm, which uses the batch's statistics
    (and keeps its running ones) wherever the trained backbone is not frozen. The copy is
    part of this loss's state, so a resumed run distils towards the same start.
    """

    input_key: ClassVar[str] = "backbone"
    # Nothing to distil while the whole backbone is frozen: a linear probe leaves it out.
    needs_trainable_backbone: ClassVar[bool] = True

    def __init__(self, layer: str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.teacher: nn.Module | None = None
        self._batch_statistics: list[bool] = []
        self._captured: dict[str, torch.Tensor] = {}

    def attach(self, model: nn.Module) -> None:
        """Copy `model.backbone` as the target and watch the model's backbone input."""
        backbone: nn.Module = model.backbone  # type: ignore[assignment]
        modules = dict(backbone.named_modules())
        if self.layer is not None and self.layer not in modules:
            raise ConfigError(
                f"FeatureDistillLoss.layer: the backbone has no module '{self.layer}'"
            )
        frozen = {
            id(sub) for module in getattr(model, "frozen_modules", ()) for sub in module.modules()
        }
        batch_statistics = [
            isinstance(sub, nn.modules.batchnorm._BatchNorm) and id(sub) not in frozen
            for sub in backbone.modules()
        ]
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)
        self._batch_statistics = batch_statistics
        self._set_teacher_modes()
        backbone.register_forward_pre_hook(self._capture_input)
        if self.layer is not None:
            modules[self.layer].register_forward_hook(self._capture("student"))
            dict(self.teacher.named_modules())[self.layer].register_forward_hook(
                self._capture("teacher")
            )

    def _set_teacher_modes(self) -> None:
        assert self.teacher is not None
        self.teacher.eval()
        for sub, batch in zip(self.teacher.modules(), self._batch_statistics, strict=True):
            if batch:
                sub.train()
                sub.momentum = 0.0  # type: ignore[assignment]  # running statistics stay

    def train(self, mode: bool = True) -> FeatureDistillLoss:
        super().train(mode)
        if self.teacher is not None:
            self._set_teacher_modes()  # the target's modes never follow the run's
        return self

    def _capture_input(self, _module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():  # training steps only; evaluation runs without grad
            self._captured["input"] = args[0]

    def _capture(self, key: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if key == "teacher" or torch.is_grad_enabled():
                self._captured[key] = output

        return hook

    def forward(self, backbone_output: torch.Tensor, _label: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError(
                "FeatureDistillLoss needs the model it distils: call attach(model) first "
                "(the Trainer does)"
            )
        images = self._captured.pop("input", None)
        if images is None:
            raise RuntimeError("FeatureDistillLoss: no training batch went through the backbone")
        with torch.no_grad():
            target = self.teacher(images)
        if self.layer is not None:
            student, target = self._captured.pop("student"), self._captured.pop("teacher")
        else:
            student = backbone_output
        student = F.normalize(student.float().flatten(1), dim=1)
        target = F.normalize(target.float().flatten(1), dim=1)
        return (student - target).pow(2).sum(1).mean()
