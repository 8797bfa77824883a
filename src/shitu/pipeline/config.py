"""The recognition pipeline's config: PaddleClas's `inference_general.yaml` shape, typed.

PaddleClas keys that only steer Paddle's runtime (use_gpu, ir_optim, ...) or index
building (index_method, data_file, ...) are accepted and ignored, so its files load
as they are; any other unknown key is an error. Pre/post-processing sections are
ignored too (an export records its own preprocessing, and the detector its own), except
DetPreProcess's DetResize: its target_size is the detector's input size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shitu.config.loader import (
    apply_attributed_overrides,
    find_config,
    read_yaml,
    resolve_config_path,
    with_source,
)
from shitu.errors import ConfigError
from shitu.pipeline.defaults import NO_DETECTOR, PIPELINE_CONFIG_DIR, PLAIN_BACKGROUND, SETTINGS
from shitu.registry import (
    ConfigPath,
    format_validation_error,
    null_is_default,
    refuse_bool_as_number,
)
from shitu.runtime import MAX_THREADS

logger = logging.getLogger(__name__)

_IGNORED_GLOBAL = {
    "infer_imgs",
    "image_shape",
    "label_list",
    "labe_list",  # PaddleClas's own spelling in its deploy configs
    "use_gpu",
    "enable_mkldnn",
    "cpu_num_threads_det",
    "enable_benchmark",
    "enable_profile",
    "gpu_mem",
    "use_fp16",
    "ir_optim",
    "use_tensorrt",
    "print_config",
}
# Index building belongs to `shitu index build`; only the top hit is used (as PaddleClas).
_IGNORED_INDEX = {
    "index_method",
    "image_root",
    "data_file",
    "index_operation",
    "delimiter",
    "dist_type",
    "embedding_size",
    "batch_size",
    "return_k",
    "hamming_radius",
}
_IGNORED_SECTIONS = {"DetPostProcess", "RecPreProcess", "RecPostProcess"}
# Why each is ignored, for an -o that sets one: the user's wish that nothing carries out.
_IGNORED_WHY = {
    "Global": (_IGNORED_GLOBAL, "it steers Paddle's runtime"),
    "IndexProcess": (
        _IGNORED_INDEX,
        "`shitu index build` builds libraries, and only the top hit is used",
    ),
}
_IGNORED_SECTION_WHY = "an export records its own preprocessing, and a detector its own"
# DetResize as PP-ShiTu's configs give it, the resize shitu's detectors do (PaddleClas's own
# defaults, where a key is left out, are keep_ratio: true and interp: 1, bilinear).
_DET_RESIZE = {"keep_ratio": False, "interp": 2}
Backend = Literal["auto", "onnxruntime", "torch"]
RecBackend = Literal[
    "auto", "onnxruntime", "openvino", "torch"
]  # openvino: pip install 'shitu[openvino]'
Precision = Literal["fp32", "int8", "fp16", "bf16"]


def _drop(data: Any, ignored: set[str]) -> Any:
    return {k: v for k, v in data.items() if k not in ignored} if isinstance(data, dict) else data


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    _refuse_bool_as_number = field_validator("*", mode="before")(refuse_bool_as_number)
    _null_is_default = field_validator("*", mode="before")(null_is_default)


class PipelineGlobal(_Section):
    # Exported model folder (`shitu export`); null: the model shipped with shitu.
    rec_inference_model_dir: ConfigPath | None = None
    rec_backend: RecBackend = "auto"
    # int8: the export's model.int8.onnx (`shitu export --int8-calibration`), the fastest CPU
    # path; its features differ from fp32's, so a library built in one is searched in it.
    rec_precision: Precision = "fp32"
    # Detector file (.onnx, .pdparams with det_arch, our .pt), "plain-background", or
    # "none"/null: the whole image is the only candidate box.
    det_inference_model_dir: ConfigPath | None = None
    det_backend: Backend = "auto"
    det_arch: str | None = None
    threshold: float = Field(default=0.2, ge=0.0, le=1.0)  # detector score threshold
    max_det_results: int = Field(default=5, ge=0)
    rec_nms_thresold: float = Field(default=0.05, ge=0.0, le=1.0)  # PaddleClas's spelling
    batch_size: int = Field(default=32, ge=1)
    cpu_num_threads: int | None = Field(default=None, ge=1, le=MAX_THREADS)

    @model_validator(mode="before")
    @classmethod
    def _paddle_only(cls, data: Any) -> Any:
        return _drop(data, _IGNORED_GLOBAL)

    @field_validator("rec_inference_model_dir", "det_inference_model_dir")
    @classmethod
    def _empty_is_none_given(cls, value: str | None) -> str | None:
        """An empty path (`--model "$UNSET"`, `''` in a file) is none given: the shipped
        model, no detector, and a library refused for another model says that no --model
        was given."""
        return value or None


class IndexProcessConfig(_Section):
    index_dir: ConfigPath | None = None  # gallery library folder (`shitu index build --out`)
    # Cosine similarity in [-1, 1] a box's best hit needs (IP and L2 libraries alike);
    # null: the model's calibrated one (its shitu_model.json), else DEFAULT_SCORE_THRES.
    score_thres: float | None = Field(default=None, ge=-1.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _building_only(cls, data: Any) -> Any:
        return _drop(data, _IGNORED_INDEX)


def det_resize_size(transform_ops: Any) -> int | None:
    """The detector input side DetPreProcess's DetResize sets (None without one); a resize
    the detectors cannot do is a ValueError saying what they do, not ignored."""
    from shitu.detection.input_size import check_input_size

    ops = transform_ops if isinstance(transform_ops, list) else []
    resizes = [op["DetResize"] for op in ops if isinstance(op, dict) and "DetResize" in op]
    if not resizes:
        return None
    resize = resizes[-1] if isinstance(resizes[-1], dict) else {}
    for key, value in _DET_RESIZE.items():
        if resize.get(key) != value:
            given = repr(resize[key]) if key in resize else "not given (PaddleClas's default)"
            raise ValueError(
                f"DetResize {key}: {given}; shitu's detectors resize to target_size without "
                "keeping the aspect ratio, bicubic: give keep_ratio: false, interp: 2, as "
                "PP-ShiTu's configs do"
            )
    target = resize.get("target_size")
    sides = [target, target] if isinstance(target, int) else target
    if not isinstance(sides, list) or len(sides) != 2 or sides[0] != sides[1]:
        raise ValueError(
            f"DetResize target_size: {target!r}; shitu's detectors take a square input, "
            "[S, S] with S a multiple of 32 (PP-ShiTu's mainbody detector: [640, 640])"
        )
    try:
        return check_input_size(sides[0])
    except ConfigError as exc:
        raise ValueError(f"DetResize target_size: {exc}") from None


class DetPreProcessConfig(BaseModel):
    """PaddleClas's detector preprocessing: its DetResize's target_size is the detector's
    input size; its other ops (normalisation, layout) are the detector's own, ignored."""

    model_config = ConfigDict(extra="forbid")
    transform_ops: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _resize_the_detectors_do(cls, data: Any) -> Any:
        if isinstance(data, dict):
            det_resize_size(data.get("transform_ops"))
        return data

    @property
    def input_size(self) -> int | None:
        return det_resize_size(self.transform_ops)


class PipelineConfig(_Section):
    Global: PipelineGlobal = Field(default_factory=PipelineGlobal)
    IndexProcess: IndexProcessConfig = Field(default_factory=IndexProcessConfig)
    DetPreProcess: DetPreProcessConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _processing_sections(cls, data: Any) -> Any:
        return _drop(data, _IGNORED_SECTIONS)

    @property
    def detector(self) -> str | None:
        """The detector path or PLAIN_BACKGROUND; None for the whole image only. Keywords
        in any case, as `None` in a YAML file or `--detector None` is no detector."""
        value = self.Global.det_inference_model_dir
        keyword = None if value is None else value.lower()
        if keyword == PLAIN_BACKGROUND:
            return PLAIN_BACKGROUND
        return None if keyword is None or keyword == NO_DETECTOR else value


def load_pipeline_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Defaults, or a YAML file / shipped name, with `-o Section.key=value` overrides."""
    if name_or_path is not None and not isinstance(name_or_path, str | os.PathLike):
        raise ConfigError(  # else a TypeError inside pathlib
            f"expected a pipeline config's name or path, got {type(name_or_path).__name__} "
            f"{name_or_path!r}"
        )
    source = _pipeline_source(name_or_path) if name_or_path else None
    raw = read_yaml(source) if source else {}
    if "Arch" in raw:  # else a list of each of its keys, unknown
        raise ConfigError(
            f"{name_or_path}: a training config (its Arch section); -c here (config= in "
            "Python) takes a recognition pipeline config (Global, IndexProcess: PaddleClas's "
            "inference_general.yaml): give the model that `shitu export -c CONFIG --out DIR` "
            "makes as --model DIR (model=DIR in Python)"
        )
    where = str(source) if source else "pipeline defaults"
    attribution = apply_attributed_overrides(raw, overrides, where)
    _warn_of_ignored_overrides(attribution)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        message = format_validation_error(exc, PipelineConfig, what="the pipeline config")
        raise ConfigError(with_source(where, message, attribution)) from None


def _warn_of_ignored_overrides(attribution: dict[str, str]) -> None:
    """A PaddleClas key that shitu ignores loads quietly from a file, but set with -o it
    is asked for: say that it changes nothing, and why (`attribution`: dotted key -> the
    override's text)."""
    for dotted, text in attribution.items():
        section, _, rest = dotted.partition(".")
        keys, why = _IGNORED_WHY.get(section, (set(), ""))
        if section in _IGNORED_SECTIONS:
            why = _IGNORED_SECTION_WHY
        elif rest.split(".")[0] not in keys:
            continue
        logger.warning("-o %s: PaddleClas's setting, which shitu ignores (%s)", text, why)


def with_settings(config: PipelineConfig, settings: dict[str, Any]) -> PipelineConfig:
    """`config` with each of `settings` (names of SETTINGS) that is not None written over
    its key, paths as text; a value the key cannot take is a ConfigError naming both. No
    setting is a yes/no: True would pass as 1 (`score_thres=True` recognising nothing)."""
    for name, value in settings.items():
        if value is None:
            continue
        section, key = SETTINGS[name]
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} ({section}.{key}): expected a value, not a bool")
        try:
            setattr(
                getattr(config, section),
                key,
                os.fspath(value) if isinstance(value, Path) else value,
            )
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ConfigError(f"{name}={value!r} ({section}.{key}): {reason}") from None
    return config


def _pipeline_source(name_or_path: str | Path) -> Path:
    """The pipeline config's file, or a shipped training config's: given by its name (`-c
    GroceryStore_EfficientNetLite0`), that is refused as a training config, not as missing."""
    try:
        return find_config(name_or_path, PIPELINE_CONFIG_DIR, "pipeline config")
    except ConfigError as missing:
        try:
            return resolve_config_path(name_or_path)
        except ConfigError:
            raise missing from None
