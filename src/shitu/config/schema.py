"""Typed config sections. Unknown keys are errors, so typos never pass silently.

The shape follows PaddleClas (Global, Arch, Loss, Optimizer, DataLoader, Metric, EMA)
so its recognition configs read naturally; component sections (`Arch.Backbone`,
losses, ...) hold a `name` plus that component's constructor arguments, which
are checked against the registered constructor's signature.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from shitu.inference.choices import Device
from shitu.registry import BACKBONES, ConfigPath, null_is_default, refuse_bool_as_number


def only_off(refusal: str) -> Callable[[Any, bool], bool]:
    """A validator for a PaddleClas switch of a tool shitu does not have: false (as its
    configs ship) is taken, true refused with `refusal`, which says what to use instead."""

    def check(cls: Any, value: bool) -> bool:
        if value:
            raise ValueError(refusal)
        return value

    return check


class Section(BaseModel):
    # A number where text is expected is the text YAML read it as: `output_dir=2024`, a path.
    # No setting means NaN or inf (`learning_rate: .inf` trains to NaN weights).
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        coerce_numbers_to_str=True,
        allow_inf_nan=False,
    )

    _refuse_bool_as_number = field_validator("*", mode="before")(refuse_bool_as_number)
    _null_is_default = field_validator("*", mode="before")(null_is_default)


class ComponentConfig(BaseModel):
    """`name` of a registered component plus its keyword arguments."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    _refuse_bool_as_number = field_validator("*", mode="before")(refuse_bool_as_number)
    _null_is_default = field_validator("*", mode="before")(null_is_default)

    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GlobalConfig(Section):
    checkpoints: ConfigPath | None = None
    pretrained_model: ConfigPath | None = None
    output_dir: ConfigPath = "./output"
    device: Device = "auto"
    # What torch, numpy and Python's RNGs all take (numpy refuses negative seeds, torch
    # those of 2**64 and more), with room for the rank a DDP process adds.
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    save_interval: int = Field(default=1, ge=1)
    eval_during_train: bool = True
    eval_interval: int = Field(default=1, ge=1)
    epochs: int = Field(default=100, ge=1)
    print_batch_step: int = Field(default=20, ge=1)
    eval_mode: Literal["retrieval"] = "retrieval"  # PaddleClas key; recognition is retrieval
    retrieval_feature_from: Literal["features", "backbone"] = "features"
    # k-reciprocal re-ranking: true, or its settings {k1, k2, lambda_value, max_samples}.
    re_ranking: bool | dict[str, Any] = False
    image_shape: list[int] = Field(default_factory=lambda: [3, 224, 224])
    save_inference_dir: ConfigPath = "./inference"
    # Metric that picks `best_model` and drives ReduceOnPlateau, e.g. recall@1 or mAP.
    eval_metric: str = "recall@1"
    # Also save `latest` every N steps (a run killed mid-epoch then loses at most N steps).
    checkpoint_every_steps: int | None = Field(default=None, ge=1)
    amp: Literal["off", "bf16", "fp16"] = "off"
    # NHWC activations: 1.2-1.8x faster float32 training steps for the shipped recipes on a
    # 2-core CPU (benchmarks/train_throughput.py --layout nhwc nchw), and the usual layout
    # for AMP on GPUs; results differ from NCHW only by float rounding.
    channels_last: bool = True
    use_tensorboard: bool = False
    # PaddleClas keys for tools shitu does not have: read so that its configs load as they
    # are, and refused, saying what to use instead, where they ask for the tool.
    use_visualdl: bool = False
    use_dali: bool = False
    to_static: bool = False  # Paddle's dynamic-to-static graph conversion

    _no_visualdl = field_validator("use_visualdl")(
        only_off(
            "shitu has no VisualDL logging: it writes metrics.jsonl in Global.output_dir, "
            "and TensorBoard logs with Global.use_tensorboard: true"
        )
    )
    _no_to_static = field_validator("to_static")(
        only_off(
            "shitu trains PyTorch's eager model, which has no static-graph mode: leave "
            "Global.to_static false (the ONNX export, `shitu export`, is the static graph)"
        )
    )
    _no_dali = field_validator("use_dali")(
        only_off(
            "shitu has no NVIDIA DALI loader: images are decoded in the DataLoader's "
            "worker processes (loader.num_workers)"
        )
    )

    def unreached_eval_interval(self) -> str | None:
        """Why no epoch is evaluated where eval_interval exceeds epochs (a copied config's
        interval on a short run), else None: a fault that only the run's end would show."""
        if self.eval_interval <= self.epochs:
            return None
        return f"Global.eval_interval {self.eval_interval} is more than Global.epochs {self.epochs}"

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # `amp: false`, written as for a switch, is off.
        return "off" if value is False else value

    @field_validator("eval_metric")
    @classmethod
    def _metric_name(cls, value: str) -> str:
        # A misspelt name (`map`, `recall1`) is refused here; whether Metric.Eval computes
        # the metric named is checked as the components are (shitu.config.loader).
        if re.fullmatch(r"(recall|precision)@[1-9][0-9]*|mAP|mINP", value) is None:
            raise ValueError("must be recall@K, precision@K, mAP or mINP")
        return value

    @field_validator("image_shape")
    @classmethod
    def _chw(cls, value: list[int]) -> list[int]:
        # Models take 3-channel images; a height-width-channels order ([224, 224, 3]) would
        # otherwise be read as images 3 pixels wide.
        if len(value) != 3 or value[0] != 3 or min(value) < 1:
            raise ValueError("must be [3, height, width] (channels first) with positive sizes")
        return value


class StopLayerConfig(Section):
    name: str


# Arch settings that only steer training (which layers are frozen): two runs or exports
# differing only in them have weights of one model and give the same features.
TRAINING_ONLY_ARCH = ("frozen_layers",)


class ArchConfig(Section):
    name: Literal["RecModel"] = "RecModel"
    infer_output_key: Literal["features", "backbone"] = "features"
    # PaddleClas's softmax on a classifier's exported output; a recognition model exports
    # features, so only its "no" is taken. Left out of dumps: checkpoints' and exports' arch
    # records (and so the fingerprint) stay as before the key was read, the same model's.
    infer_add_softmax: bool = Field(default=False, exclude=True)
    head_feature_from: Literal["neck", "backbone"] = "neck"
    Backbone: ComponentConfig
    BackboneStopLayer: StopLayerConfig | None = None
    Neck: ComponentConfig | None = None
    Head: ComponentConfig | None = None
    # Module-name prefixes (e.g. "backbone.stem", "backbone.blocks.0") whose weights and
    # BatchNorm statistics stay as loaded: fine-tuning only the later layers is faster and
    # keeps generic low-level filters on small datasets.
    frozen_layers: list[str] = Field(default_factory=list)

    _features_not_probabilities = field_validator("infer_add_softmax")(
        only_off(
            "a recognition model exports features (Arch.infer_output_key), not class "
            "probabilities: set it to false"
        )
    )

    def backbone_pretrained(self) -> bool:
        """Whether the backbone starts from pretrained weights (Arch.Backbone.pretrained),
        typed as the backbone reads it: `pretrained: no` is false, not a file's name."""
        return bool(BACKBONES.validate(self.Backbone.name, self.Backbone.params).get("pretrained"))

    def initialisation(self) -> str:
        """How the model built from this section starts, before any weights file is loaded,
        for the notes and the training summary that say so: "as the config initialises it"
        did not say whether from pretrained backbone weights or all at random."""
        if self.backbone_pretrained():
            return (
                "its backbone's pretrained weights (Arch.Backbone.pretrained), new layers at random"
            )
        return "all at random, as it names no Arch.Backbone.pretrained weights"


def _one_loss(item: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """An item of a loss list holds one loss. Checked per item, so that the error names
    the item and its losses (an `-o Loss.Train.0.CELos.weight=1` typo adds a second), not
    the whole list. A loss with nothing under it (`- CELoss:`, YAML's null) takes its
    defaults, as a null setting does: it was refused as 'not a valid dictionary'."""
    if len(item) != 1:
        held = f"{len(item)} losses ({', '.join(map(str, item))})" if item else "no loss"
        raise ValueError(
            f"holds {held}; each item must be a single '{{LossName: {{params}}}}' mapping"
        )
    return {name: params or {} for name, params in item.items()}


LossList = list[Annotated[dict[str, dict[str, Any] | None], AfterValidator(_one_loss)]]


class LossConfig(Section):
    Train: LossList = Field(default_factory=list)
    # PaddleClas configs list their eval losses here: read and checked, not computed
    # (retrieval evaluation reports recall and mAP, not a loss).
    Eval: LossList = Field(default_factory=list)


class LRConfig(ComponentConfig):
    """Learning-rate schedule: `name` plus schedule parameters (e.g. Cosine, Piecewise)."""

    learning_rate: float = Field(gt=0)
    warmup_epoch: int = Field(default=0, ge=0)
    # `learning_rate` is tuned for this total batch size and is scaled linearly to the real one.
    base_batch_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _piecewise_rate_from_its_values(cls, data: Any) -> Any:
        """PaddleClas's Piecewise starts at its first `values` entry and takes no
        `learning_rate`, so its configs may leave that out: the first value is then the
        learning rate (which a config giving both must match, below)."""
        if (
            isinstance(data, dict)
            and data.get("name") == "Piecewise"
            and data.get("learning_rate") is None
            and isinstance(data.get("values"), list)
            and data["values"]
        ):
            return {**data, "learning_rate": data["values"][0]}
        return data

    @model_validator(mode="after")
    def _piecewise_values_start_at_learning_rate(self) -> LRConfig:
        # Piecewise `values` are scaled with `learning_rate`, so the two must agree.
        values = self.params.get("values")
        if self.name != "Piecewise" or values is None:
            return self
        if self.params.get("gamma") is not None:  # one of them sets the pieces' rates
            raise ValueError("Piecewise takes values or gamma, not both: gamma is unused")
        if not isinstance(values, list) or not values:
            raise ValueError(f"Piecewise values must be a list of rates, got {values!r}")
        if values[0] != self.learning_rate:
            raise ValueError(
                f"Piecewise values start at {values[0]} but learning_rate is "
                f"{self.learning_rate}: the first value is the starting rate, make them equal"
            )
        return self


class RegularizerConfig(Section):
    name: Literal["L2", "L1"] = "L2"
    coeff: float = Field(default=0.0, ge=0)

    @field_validator("name")
    @classmethod
    def _only_l2(cls, value: str) -> str:
        # Read so that a PaddleClas config's L1 is named as the config loads, not once
        # training has built its data and model.
        if value == "L1":
            raise ValueError("only L2 is supported (L1 is not a weight decay)")
        return value


class OptimizerConfig(Section):
    name: Literal["Momentum", "SGD", "Adam", "AdamW"]
    lr: LRConfig
    # The ranges torch accepts (it raised a bare ValueError only as the optimizer was built);
    # a negative weight decay would pull the weights away from zero. A momentum of 1 or more
    # (which torch takes) never forgets a gradient: the steps grow until the loss is NaN.
    momentum: float | None = Field(default=None, ge=0, lt=1)
    beta1: float | None = Field(default=None, ge=0, lt=1)
    beta2: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float | None = Field(default=None, ge=0)
    regularizer: RegularizerConfig | None = None
    # Space-separated name fragments of parameters that get no weight decay (PaddleClas style).
    no_weight_decay_name: str | None = None
    # Weight decay on normalisation layers and biases too (off: the usual, better choice).
    decay_norm_and_bias: bool = False
    clip_norm: float | None = Field(default=None, gt=0)
    # Learning-rate multipliers by module name, e.g. {backbone.blocks: 0.25}: pretrained
    # layers can move slower than new ones. The longest matching name wins; others get 1.
    lr_mult: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_weight_decay(self) -> OptimizerConfig:
        # Both set the one decay coefficient; PaddleClas keeps regularizer's (with a
        # warning), so a PaddleClas config's intent is unclear, and either choice is silent.
        if self.weight_decay is not None and self.regularizer is not None:
            raise ValueError(
                f"weight_decay ({self.weight_decay}) and regularizer (coeff "
                f"{self.regularizer.coeff}) both set the weight decay; keep one (e.g. "
                "-o Optimizer.regularizer=null)"
            )
        return self

    @field_validator("no_weight_decay_name", mode="before")
    @classmethod
    def _fragments_as_listed(cls, value: Any) -> Any:
        """`[bn, bias]`, the YAML list a user writes for several names, is the space-
        separated `bn bias` PaddleClas writes: it was refused as 'not a valid string'."""
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return " ".join(value)
        return value

    @field_validator("lr_mult", mode="before")
    @classmethod
    def _dotted_names(cls, value: Any) -> Any:
        """`{backbone: {blocks: 0.25}}` (what `-o Optimizer.lr_mult.backbone.blocks=0.25`
        makes) means `{backbone.blocks: 0.25}`; a null multiplier (`-o ...=null`) is none,
        the modules' rate back to the default of 1, as null gives any key its default."""

        def flatten(mapping: dict, prefix: str) -> dict:
            flat: dict = {}
            for key, item in mapping.items():
                name = f"{prefix}{key}"
                flat.update(flatten(item, f"{name}.") if isinstance(item, dict) else {name: item})
            return flat

        if not isinstance(value, dict):
            return value
        return {name: mult for name, mult in flatten(value, "").items() if mult is not None}

    @field_validator("lr_mult")
    @classmethod
    def _positive_multipliers(cls, value: dict[str, float]) -> dict[str, float]:
        for name, mult in value.items():
            if mult <= 0:
                raise ValueError(
                    f"{name}: {mult} is not a positive multiplier (freeze a module with "
                    "Arch.frozen_layers instead)"
                )
        return value


class LoaderOptions(Section):
    num_workers: int = Field(default=4, ge=0)
    use_shared_memory: bool = True


class DataSplitConfig(Section):
    dataset: ComponentConfig
    sampler: ComponentConfig | None = None
    loader: LoaderOptions = Field(default_factory=LoaderOptions)


class EvalDataConfig(Section):
    Query: DataSplitConfig | None = None
    Gallery: DataSplitConfig | None = None


class DataLoaderConfig(Section):
    Train: DataSplitConfig | None = None
    Eval: EvalDataConfig | None = None


MetricList = list[dict[str, dict[str, Any] | None]]


class MetricConfig(Section):
    # PaddleClas's training metrics (TopkAcc): read so that its configs load, not computed
    # (metrics.jsonl logs the training loss; evaluation reports Eval's retrieval metrics).
    Train: MetricList = Field(default_factory=list)
    Eval: MetricList = Field(default_factory=list)


class EMAConfig(Section):
    """Evaluate and save a moving average of the weights (PaddleClas's `EMA` section).

    `decay` per optimizer step: the average spans about 1 / (1 - decay) steps."""

    decay: float = Field(gt=0, lt=1)


class LinearProbeConfig(Section):
    """Fit the new layers on frozen pretrained features before fine-tuning (LP-FT, Kumar et
    al., ICLR 2022), so that a randomly initialised head does not pull the pretrained
    features around in the first steps.

    `shitu train` first runs a probe of its own into `output_dir/linear_probe`: `epochs`
    epochs with `frozen_layers` frozen (and `Arch.frozen_layers`, frozen in both stages),
    every other layer at the full learning rate (no
    `Optimizer.lr_mult`), no evaluation and no EMA; then the configured run starts from
    the probe's weights."""

    epochs: int = Field(ge=1)
    frozen_layers: list[str] = Field(min_length=1)


class ShituConfig(Section):
    Global: GlobalConfig = Field(default_factory=GlobalConfig)
    Arch: ArchConfig
    Loss: LossConfig | None = None
    Optimizer: OptimizerConfig | None = None
    DataLoader: DataLoaderConfig | None = None
    Metric: MetricConfig | None = None
    EMA: EMAConfig | None = None
    LinearProbe: LinearProbeConfig | None = None
