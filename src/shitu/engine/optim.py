"""Optimizers from the `Optimizer` config section, with per-parameter-group weight decay."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from shitu.config.schema import OptimizerConfig
from shitu.errors import ConfigError
from shitu.models.rec_model import modules_beside

# The torch optimizer each `Optimizer.name` builds (Momentum and SGD differ in momentum only).
OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "Momentum": torch.optim.SGD,
    "SGD": torch.optim.SGD,
    "Adam": torch.optim.Adam,
    "AdamW": torch.optim.AdamW,
}

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def weight_decay_of(config: OptimizerConfig) -> float:
    """The decay coefficient: `weight_decay` or PaddleClas's `regularizer: {name: L2, coeff}`
    (the config refuses both at once)."""
    if config.weight_decay is not None:
        return config.weight_decay
    if config.regularizer is not None:  # L2: the config refuses L1
        return config.regularizer.coeff
    return 0.0


def parameter_groups(
    modules: Iterable[nn.Module], config: OptimizerConfig
) -> list[dict[str, object]]:
    """Trainable parameters grouped by weight decay and learning-rate multiplier.

    No decay on normalisation layers and biases (unless `decay_norm_and_bias`) nor on
    names containing a `no_weight_decay_name` fragment. Frozen parameters (e.g. the
    BNNeck bias) are left out, so no optimizer state or decay ever touches them. Each
    group's `lr_mult` comes from `config.lr_mult` (longest matching module name, else 1).
    """
    modules = list(modules)  # (read twice)
    fragments = (config.no_weight_decay_name or "").split()
    weight_decay = weight_decay_of(config)
    # Longest name first, so `backbone.blocks.5` overrides `backbone.blocks`.
    multipliers = sorted(config.lr_mult.items(), key=lambda item: -len(item[0]))
    used: set[str] = set()
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
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
                decayed = not (exempt or any(fragment in full_name for fragment in fragments))
                # A name whose parameters all fall under longer names is used, not a typo.
                matching = [(n, v) for n, v in multipliers if full_name.startswith(f"{n}.")]
                used.update(name for name, _ in matching)
                mult = matching[0][1] if matching else 1.0
                groups.setdefault((decayed, mult), []).append(param)
    _check_fragments_match(modules, fragments)
    unused = [name for name in config.lr_mult if name not in used]
    if unused:
        names = {name: sub for module in modules for name, sub in module.named_modules()}
        missing = [name for name in unused if name not in names]
        hint = (
            f"no such module; modules there: {', '.join(modules_beside(missing[0], names))}"
            if missing
            else "frozen modules have none"
        )
        raise ConfigError(
            f"Optimizer.lr_mult: no trainable parameter under {', '.join(unused)} ({hint})"
        )
    # Decayed groups first, as checkpoints of runs without multipliers have them.
    return [
        {"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0, "lr_mult": key[1]}
        for key in sorted(groups, key=lambda key: (not key[0], key[1]))
    ]


def _check_fragments_match(modules: list[nn.Module], fragments: list[str]) -> None:
    """A `no_weight_decay_name` fragment in no parameter's name (a typo, or a PaddleClas
    config's Paddle parameter names, `.b_0`) exempts nothing, without a word otherwise.
    Frozen parameters count: a fragment for them is no typo."""
    names = [name for module in modules for name, _ in module.named_parameters()]
    unmatched = [fragment for fragment in fragments if not any(fragment in n for n in names)]
    if unmatched:
        raise ConfigError(
            f"Optimizer.no_weight_decay_name: no parameter name contains "
            f"{', '.join(map(repr, unmatched))} (names are such as {', '.join(names[:3])})"
        )


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    """The schedule's rate for this step, times each group's `lr_mult`."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate * group.get("lr_mult", 1.0)


def build_optimizer(
    modules: Iterable[nn.Module], config: OptimizerConfig, learning_rate: float
) -> torch.optim.Optimizer:
    """The configured optimizer over every trainable parameter of `modules` (model, loss)."""
    groups = parameter_groups(modules, config)
    if not groups:
        raise ConfigError(
            "Arch.frozen_layers: nothing to train, every parameter is frozen (in the probe "
            "of a LinearProbe run, by LinearProbe.frozen_layers and Arch.frozen_layers); "
            "leave a layer unfrozen"
        )
    name, optimizer_class = config.name, OPTIMIZER_CLASSES[config.name]
    # A setting of the other family, left from a config's earlier optimizer, changes nothing.
    other_family = ("beta1", "beta2") if optimizer_class is torch.optim.SGD else ("momentum",)
    unused = [key for key in other_family if getattr(config, key) is not None]
    if unused:
        logger.warning(
            "Optimizer.%s: %s takes no %s, so %s unused",
            unused[0],
            name,
            " or ".join(unused),
            "it is" if len(unused) == 1 else "they are",
        )
    if optimizer_class is torch.optim.SGD:
        momentum = (
            config.momentum if config.momentum is not None else (0.9 if name == "Momentum" else 0.0)
        )
        return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum)
    betas = (
        0.9 if config.beta1 is None else config.beta1,
        0.999 if config.beta2 is None else config.beta2,
    )
    return optimizer_class(groups, lr=learning_rate, betas=betas)
