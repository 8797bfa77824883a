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
from shitu.losses._pairs import zero_loss
from shitu.registry import LOSSES


@LOSSES.register("FeatureDistillLoss")
class FeatureDistillLoss(nn.Module):
    """mean over the batch of ||s/|s| - t/|t|||^2 (= 2 - 2 cos(s, t)); 0 for an empty batch.

    s: the backbone's output, or the output of its sub-module `layer` (e.g. `flatten`, the
    pooled features before an embedding layer); t: the same from the frozen copy of the
    backbone made by `attach` (the Trainer calls it once the starting weights are loaded).
    The copy runs as the trained backbone does, so that at step 0 s equals t: its modules
    in eval mode (no stochastic depth) except BatchNorm, which uses the batch's statistics
    (and keeps its running ones) wherever the trained backbone is not frozen, under the
    autocast the training step ran in. The copy is part of this loss's state, so a resumed
    run distils towards the same start.

    Frozen layers (`Arch.frozen_layers`) are the same in both networks, so where the copy
    feeds one the very input the trained backbone fed it (the stem and the blocks after
    it, up to the first trained layer), the copy takes the trained backbone's output
    instead of computing it again.
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
        self._autocast: tuple[str, torch.dtype, bool] = ("cpu", torch.bfloat16, False)
        # frozen layer name -> (input, output) of the trained backbone's last training step
        self._frozen_calls: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def attach(self, model: nn.Module) -> None:
        """Copy `model.backbone` as the target and watch the model's backbone input."""
        backbone: nn.Module = model.backbone  # type: ignore[assignment]
        modules = dict(backbone.named_modules())
        if self.layer is not None and self.layer not in modules:
            top = [name for name in modules if name and "." not in name]
            raise ConfigError(
                f"FeatureDistillLoss.layer: the backbone has no module '{self.layer}' (its "
                f"top-level modules: {', '.join(top)})"
            )
        frozen_roots: list[nn.Module] = list(getattr(model, "frozen_modules", ()))
        frozen = {id(sub) for module in frozen_roots for sub in module.modules()}
        batch_statistics = [
            isinstance(sub, nn.modules.batchnorm._BatchNorm) and id(sub) not in frozen
            for sub in backbone.modules()
        ]
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)
        self._batch_statistics = batch_statistics
        self._set_teacher_modes()
        backbone.register_forward_pre_hook(self._capture_input)
        teacher_modules = dict(self.teacher.named_modules())
        if self.layer is not None:
            modules[self.layer].register_forward_hook(self._capture("student"))
            teacher_modules[self.layer].register_forward_hook(self._capture("teacher"))
        roots = {id(module) for module in frozen_roots}
        for name, module in modules.items():
            if name and id(module) in roots:
                module.register_forward_hook(self._record_frozen_call(name))
                self._replay_frozen_calls(name, teacher_modules[name])

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
            images = args[0]
            self._captured["input"] = images
            device = images.device.type
            self._autocast = (
                device,
                torch.get_autocast_dtype(device),
                torch.is_autocast_enabled(device),
            )

    def _record_frozen_call(self, name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and len(args) == 1:
                self._frozen_calls[name] = (args[0], output)

        return hook

    def _replay_frozen_calls(self, name: str, module: nn.Module) -> None:
        """Make the copy's frozen `module` return the trained one's output for the same input.

        Set on the instance, not by wrapping the module, so that the copy's state_dict keys
        (checkpoints) stay those of the backbone.
        """
        compute = module.forward

        def forward(*args: torch.Tensor) -> torch.Tensor:
            call = self._frozen_calls.get(name)
            if call is not None and len(args) == 1 and args[0] is call[0]:
                return call[1]
            return compute(*args)

        module.forward = forward  # type: ignore[method-assign]

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
        device, dtype, enabled = self._autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            target = self.teacher(images)
        self._frozen_calls.clear()
        if self.layer is not None:
            student, target = self._captured.pop("student"), self._captured.pop("teacher")
        else:
            student = backbone_output
        if student.shape[0] == 0:
            return zero_loss(student)
        student = F.normalize(student.float().flatten(1), dim=1)
        target = F.normalize(target.float().flatten(1), dim=1)
        return (student - target).pow(2).sum(1).mean()
