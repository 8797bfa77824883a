"""The two runs of a `LinearProbe` config (LP-FT): a probe on frozen features, then the
configured fine-tuning from the probe's weights.

Each stage is an ordinary config, so a probed run gives exactly what the two `shitu train`
commands it stands for give, and resuming the fine-tuning needs nothing from the probe.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from shitu import registry
from shitu.config.schema import ShituConfig
from shitu.engine.lr import Stage
from shitu.engine.state import FINAL
from shitu.errors import ConfigError
from shitu.models.rec_model import modules_beside

PROBE_DIR = "linear_probe"
# How messages name each stage (the probe has epochs of its own, and is not resumed).
PROBE = Stage("the linear probe", "LinearProbe.epochs", resumable=False)
FINE_TUNING = Stage("the fine-tuning", "Global.epochs")


def probe_weights_path(config: ShituConfig) -> Path:
    """Where the probe of `config` leaves the weights the fine-tuning starts from."""
    return Path(config.Global.output_dir) / PROBE_DIR / f"{FINAL}.safetensors"


def probe_stage(config: ShituConfig) -> ShituConfig:
    """The probe: `LinearProbe.frozen_layers` frozen, as well as `Arch.frozen_layers` (the
    layers the config keeps as they start: trained by the probe, they would reach the
    fine-tuning changed, and stay so), the rest at one learning rate."""
    if config.LinearProbe is None:
        raise ValueError("the config has no LinearProbe section")
    stage = config.model_copy(deep=True)
    stage.LinearProbe = None
    stage.EMA = None
    stage.Global.epochs = config.LinearProbe.epochs
    stage.Global.eval_during_train = False
    stage.Global.checkpoints = None
    stage.Global.output_dir = str(probe_weights_path(config).parent)
    stage.Arch.frozen_layers = list(
        dict.fromkeys([*config.Arch.frozen_layers, *config.LinearProbe.frozen_layers])
    )
    if stage.Optimizer is not None:  # (the trainer names a missing section)
        stage.Optimizer.lr_mult = {}
    if stage.Loss is not None:
        registry.populate()
        stage.Loss.Train = [item for item in stage.Loss.Train if not _needs_trainable(item)]
    return stage


def check_probe_layers(config: ShituConfig, model: nn.Module) -> None:
    """A ConfigError naming `LinearProbe.frozen_layers` for each of its names that is no
    module of `model` (the fine-tuning stage's, which has the probe's modules), or where
    they freeze every layer left to train. The probe stage freezes them as its
    `Arch.frozen_layers`, whose own checks named that key, one the config does not set
    (or need not: `LinearProbe.frozen_layers: [backbone, neck, head]`)."""
    if config.LinearProbe is None:
        return
    probed = config.LinearProbe.frozen_layers
    modules = dict(model.named_modules())
    unknown = [name for name in probed if name not in modules]
    if unknown:
        raise ConfigError(
            f"LinearProbe.frozen_layers: the model has no module {', '.join(map(repr, unknown))} "
            f"(modules there: {', '.join(modules_beside(unknown[0], modules))})"
        )
    frozen = tuple(f"{name}." for name in probed)
    if not any(p.requires_grad and not n.startswith(frozen) for n, p in model.named_parameters()):
        raise ConfigError(
            f"LinearProbe.frozen_layers: {', '.join(probed)} (with Arch.frozen_layers) freeze "
            "every layer, so the probe would train nothing; leave the layers it fits (the "
            "head, or the neck) unfrozen"
        )


def _needs_trainable(item: dict) -> bool:
    """Whether a `Loss.Train` item is a loss with nothing to do on a frozen backbone."""
    ((name, _),) = item.items()
    return getattr(registry.LOSSES.get(name), "needs_trainable_backbone", False)


def fine_tune_stage(config: ShituConfig) -> ShituConfig:
    """The configured run, started from the probe's weights."""
    stage = config.model_copy(deep=True)
    stage.LinearProbe = None
    stage.Global.pretrained_model = str(probe_weights_path(config))
    return stage
