"""The recognition model: Backbone -> Neck -> Head, as PaddleClas's RecModel."""

from __future__ import annotations

import torch
from torch import nn

from shitu import registry
from shitu.config.schema import ArchConfig, ComponentConfig
from shitu.errors import ConfigError, weight_file_setting
from shitu.models.reparam import reparameterize


class RecModel(nn.Module):
    """Backbone -> Neck -> Head; `forward` returns a dict of every stage's output.

    Keys: `backbone`, `neck` (if any), `features` (the embedding), `logits` (if a head).

    `features` is the neck output, or the backbone output without a neck. The head
    sees `features` (or `backbone` with head_feature_from='backbone') and the label.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module | None = None,
        head: nn.Module | None = None,
        head_feature_from: str = "neck",
        frozen_layers: list[str] | tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.head_feature_from = head_feature_from
        self.frozen_modules = self._freeze(frozen_layers)

    def _freeze(self, prefixes: list[str] | tuple[str, ...]) -> list[nn.Module]:
        """Stop gradients into the named modules; `train()` keeps them in eval mode."""
        frozen: list[nn.Module] = []
        names = dict(self.named_modules())
        for prefix in prefixes:
            if prefix not in names:
                raise ConfigError(
                    f"Arch.frozen_layers: the model has no module '{prefix}' (modules there: "
                    f"{', '.join(modules_beside(prefix, names))})"
                )
            names[prefix].requires_grad_(False)
            frozen.append(names[prefix])
        return frozen

    def train(self, mode: bool = True) -> RecModel:
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    @property
    def output_keys(self) -> tuple[str, ...]:
        """The keys `forward` returns, known before any image goes through."""
        neck = ("neck",) if self.neck is not None else ()
        return ("backbone", *neck, "features", *(("logits",) if self.head is not None else ()))

    def trains_output(self, key: str) -> bool:
        """Whether output `key` (one of `output_keys`) comes through a trainable parameter,
        so that a loss on it can train something: not where `Arch.frozen_layers` froze
        every stage it passes."""
        features = [self.backbone, *([self.neck] if self.neck is not None else [])]
        through = {
            "backbone": [self.backbone],
            "neck": features,
            "features": features,
            "logits": [
                *(features if self.head_feature_from != "backbone" else [self.backbone]),
                self.head,
            ],
        }[key]
        return any(
            param.requires_grad
            for module in through
            if module is not None
            for param in module.parameters()
        )

    def forward(
        self, x: torch.Tensor, label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        backbone = self.backbone(x)
        if backbone.ndim == 4 and backbone.shape[2:] == (1, 1):
            # Stopped at its pooling layer (PaddleClas's `avg_pool`): a vector, as stopped at
            # `flatten`, which evaluation, export and the metric losses take.
            backbone = backbone.flatten(1)
        out: dict[str, torch.Tensor] = {"backbone": backbone}
        if self.neck is not None:
            out["neck"] = self.neck(out["backbone"])
        out["features"] = out.get("neck", out["backbone"])
        if self.head is not None:
            source = out["backbone"] if self.head_feature_from == "backbone" else out["features"]
            out["logits"] = self.head(source, label)
        return out

    def reparameterize(self) -> RecModel:
        """Fold re-parameterisable blocks (e.g. PP-LCNetV2's parallel depthwise branches).

        Outputs are unchanged in eval mode; inference gets faster. Returns self.
        """
        reparameterize(self)
        return self


def modules_beside(name: str, modules: dict[str, nn.Module]) -> list[str]:
    """The modules where `name` would be, which it is not among: the children of its
    nearest existing parent (the model's top level for `nek`, `backbone`'s children for
    `backbone.stage`), for the message of a misspelt module name."""
    parent = name
    while parent:
        parent = parent.rpartition(".")[0]
        if parent in modules:
            break
    depth = parent.count(".") + 1 if parent else 0
    inside = f"{parent}." if parent else ""
    return [
        other
        for other in modules
        if other.startswith(inside) and other.count(".") == depth and other != parent
    ]


def build_model(arch: ArchConfig, pretrained: bool = True) -> RecModel:
    """Build a RecModel from the `Arch` section of a config.

    pretrained=False leaves out the backbone's `pretrained` weights: for callers that load a
    whole checkpoint over them next (nothing to read, nor a weights package to install).
    """
    registry.populate()
    params = arch.Backbone.params
    if not pretrained:
        params.pop("pretrained", None)
    with weight_file_setting("Arch.Backbone.pretrained"):
        backbone = registry.BACKBONES.build(arch.Backbone.name, **params)
    if arch.BackboneStopLayer is not None:
        backbone.stop_after(arch.BackboneStopLayer.name)
    neck = _build_stage("Neck", registry.NECKS, arch.Neck)
    head = _build_stage("Head", registry.HEADS, arch.Head)
    model = RecModel(
        backbone,
        neck,
        head,
        head_feature_from=arch.head_feature_from,
        frozen_layers=arch.frozen_layers,
    )
    _check_stage_sizes(model)
    return model


def _build_stage(
    section: str, components: registry.Registry, config: ComponentConfig | None
) -> nn.Module | None:
    """The Neck or Head `config` names, if any. Sizes too large to allocate (a class_num of
    the largest of 13-digit product codes) failed with torch's allocator traceback."""
    if config is None:
        return None
    try:
        return components.build(config.name, **config.params)
    except RuntimeError as exc:
        if "allocate" not in str(exc):
            raise
        sizes = ", ".join(f"{key} {value}" for key, value in config.params.items())
        raise ConfigError(
            f"Arch.{section}: {config.name} ({sizes}) needs more memory than there is "
            f"({str(exc).splitlines()[0]}); check its sizes"
        ) from None


def one_image_outputs(model: RecModel) -> dict[str, torch.Tensor]:
    """Every stage's output for one blank 64 x 64 image, in eval mode and without gradients
    (nothing changes): the outputs' widths, known before any training step."""
    training = model.training
    model.eval()
    weight = next(iter(model.state_dict().values()), None)
    device = weight.device if weight is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            image = torch.zeros(1, 3, 64, 64, device=device)
            return model(image, torch.zeros(1, dtype=torch.long, device=device))
    finally:
        model.train(training)


def _check_stage_sizes(model: RecModel) -> None:
    """One small image through every stage, so that a Neck or Head sized for another output
    than the stage before it gives, or features that are a feature map rather than a
    vector, are named now, not as a shape error inside training, or once a whole
    evaluation set is embedded."""
    try:
        outputs = one_image_outputs(model)
    except RuntimeError as exc:
        raise ConfigError(
            f"Arch: the model fails on a 1 x 3 x 64 x 64 image ({exc}); check that each stage "
            "takes the width the one before gives (e.g. Neck.num_features or "
            "Head.embedding_size against the output before it)"
        ) from None
    features = outputs["features"]
    if features.ndim != 2:
        shape = " x ".join(str(size) for size in features.shape[1:])
        raise ConfigError(
            f"Arch: the model's features are a {shape} map on a 1 x 3 x 64 x 64 image, not an "
            "embedding vector; stop the backbone at or after its pooling layer "
            "(Arch.BackboneStopLayer) or add a Neck"
        )
