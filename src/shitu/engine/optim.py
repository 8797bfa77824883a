"""Optimizers from the `Optimizer` config section, with per-parameter-group weight decay."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shitu.config.schema import OptimizerConfig
from shitu.errors import ConfigError

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def weight_decay_of(config: OptimizerConfig) -> float:
    """The decay coefficient: `weight_decay`, else PaddleClas's `regularizer: {name: L2, coeff}`."""
    if config.weight_decay is not None:
        return config.weight_decay
    if config.regularizer is not None:
        if config.regularizer.name != "L2":
            raise ConfigError(
                "Optimizer.regularizer.name: only L2 is supported (L1 is not a weight decay)"
            )
        return config.regularizer.coeff
    return 0.0


def parameter_groups(
    modules: Iterable[nn.Module], config: OptimizerConfig
) -> list[dict[str, object]]:
    """Trainable parameters split into a decayed group and a group without decay.

    No decay on normalisation layers and biases (unless `decay_norm_and_bias`) nor on
    names containing a `no_weight_decay_name` fragment. Frozen parameters (e.g. the
    BNNeck bias) are left out, so no optimizer state or decay ever touches them.
    """
    fragments = (config.no_weight_decay_name or "").split()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for module_name, sub in module.named_modules():
            for param_name, param in sub.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                exempt = not config.decay_norm_and_bias and (
                    isinstance(sub, _NORM_TYPES) or param_name == "bias" or param.ndim <= 1
                )
                if exempt or any(fragment in full_name for fragment in fragments):
                    no_decay.append(param)
                else:
                    decay.append(param)
    weight_decay = weight_decay_of(config)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    modules: Iterable[nn.Module], config: OptimizerConfig, learning_rate: float
) -> torch.optim.Optimizer:
    """The configured optimizer over every trainable parameter of `modules` (model, loss)."""
    groups = parameter_groups(modules, config)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    name = config.name
    if name in ("Momentum", "SGD"):
        momentum = (
            config.momentum if config.momentum is not None else (0.9 if name == "Momentum" else 0.0)
        )
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum)
    betas = (config.beta1 or 0.9, config.beta2 or 0.999)
    if name == "Adam":
        return torch.optim.Adam(groups, lr=learning_rate, betas=betas)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
