"""Name -> constructor registries, so configs can build components by name.

Each component package (backbones, necks, heads, losses) owns one `Registry`;
a component registers itself with a decorator in its own module and the
package imports all of its modules, so adding a component is one new file.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic_core import PydanticCustomError

from shitu.errors import ConfigError, did_you_mean, first_few
from shitu.fileio import home_expanded
from shitu.values import read_switch_word

T = TypeVar("T", bound=Callable[..., Any])

# A count in a component's signature (features, channels, classes): a config giving 0 or a
# negative number is refused by name, not by torch later with a shape error.
Size = Annotated[int, Field(gt=0)]
# A margin or weight that turns the loss round below 0 (a negative weight maximises its term).
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# A file or folder setting of a config (a schema key's type, a component parameter's
# annotation): `~/data` in a YAML file is in the home folder, as in an `-o` value. Only
# paths: a label or name starting with `~` is left as written.
ConfigPath = Annotated[str, AfterValidator(home_expanded)]


def refuse_bool_as_number(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A `field_validator("*", mode="before")` refusing YAML's true/false where a field takes
    numbers: pydantic would read them as 1 and 0 (`epochs: true` one epoch, `seed: false`
    seed 0, `class_num: true` one class)."""
    field_types = _types_in(cls.model_fields[info.field_name].annotation)
    takes_numbers = bool(field_types & {int, float})
    if takes_numbers and not field_types & {bool, Any} and _holds_bool(value):
        raise PydanticCustomError("bool_not_number", "Input should be a number, not true/false")
    return value


def switch_words_are_switches(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A `field_validator("*", mode="before")` reading yes/no/on/off as true/false where a
    field takes both a switch and text (a backbone's `pretrained`: true, or a weight
    file): text would win, and `pretrained: no` name a file `no`. A switch alone reads
    them so already, and text alone keeps them."""
    field_types = _types_in(cls.model_fields[info.field_name].annotation)
    return read_switch_word(value) if {bool, str} <= field_types else value


def null_is_default(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A `field_validator("*", mode="before")` taking null (`key: null`, `-o key=null`) for
    a key that cannot be null as the key left out: its default applies, so that an override
    can undo an optional key a config file sets. A key with no default is refused as
    required, rather than as null being no valid string or number."""
    if value is not None:
        return value
    field = cls.model_fields[info.field_name]
    if _takes_null(field.annotation):
        return value
    if field.is_required():
        raise PydanticCustomError(
            "null_for_required", "required: it has no default for null to restore"
        )
    return field.get_default(call_default_factory=True)


def _takes_null(annotation: Any) -> bool:
    """Whether None is a value of `annotation` itself (`int | None`, Any), not merely of
    something inside it (`bool | dict[str, Any]`)."""
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    origin = get_origin(annotation)
    if origin is Union or origin is UnionType or origin is Annotated:
        members = get_args(annotation)[:1] if origin is Annotated else get_args(annotation)
        return any(_takes_null(member) for member in members)
    return False


def _types_in(annotation: Any) -> set[Any]:
    """The classes an annotation is built of (`list[int] | None`: list, int, NoneType), Any
    included; the values of a Literal are not classes."""
    origin = get_origin(annotation)
    if origin is None:
        return {annotation} if annotation is Any or inspect.isclass(annotation) else set()
    if origin is Literal:
        return set()
    found = {origin} if inspect.isclass(origin) else set()
    for arg in get_args(annotation):
        found |= _types_in(arg)
    return found


def _holds_bool(value: Any) -> bool:
    """Whether `value` is a bool, or a list or mapping with one among its items."""
    if isinstance(value, bool):
        return True
    if isinstance(value, list | tuple):
        return any(_holds_bool(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_bool(item) for item in value.values())
    return False


@dataclass(frozen=True)
class Variant:
    """A registered preset of a constructor: some arguments fixed, some defaults changed.

    Like timm's model variants (`resnet50` = `ResNet` with fixed depths), without
    hiding the constructor's signature from config validation.
    """

    ctor: Callable[..., Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    def __call__(self, **kwargs: Any) -> Any:
        return self.ctor(**{**self.defaults, **kwargs, **self.fixed})


class Registry:
    """Maps component names to constructors (classes, factory functions or `Variant`s)."""

    def __init__(self, kind: str, runtime_args: tuple[str, ...] = ()) -> None:
        self.kind = kind
        # Constructor arguments the code supplies (e.g. a sampler's dataset), not the config.
        self.runtime_args = frozenset(runtime_args)
        self._entries: dict[str, Callable[..., Any]] = {}
        self._param_models: dict[str, type[BaseModel]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            key = name or obj.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._entries[key] = obj
            return obj

        return decorator

    def register_variant(
        self, name: str, ctor: Callable[..., Any], fixed: dict[str, Any], **defaults: Any
    ) -> None:
        """Register `ctor` under `name` with `fixed` arguments and changed `defaults`."""
        self.register(name)(Variant(ctor, dict(fixed), defaults))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; "
                f"available: {', '.join(self.names())}"
            ) from None

    def params_model(self, name: str) -> type[BaseModel]:
        """A pydantic model of the constructor's keyword arguments, from its signature."""
        if name not in self._param_models:
            ctor = self.get(name)
            fixed: dict[str, Any] = {}
            defaults: dict[str, Any] = {}
            if isinstance(ctor, Variant):
                fixed, defaults, ctor = ctor.fixed, ctor.defaults, ctor.ctor
            target = ctor.__init__ if inspect.isclass(ctor) else ctor
            sig = inspect.signature(target)
            hints = _type_hints(target)
            fields: dict[str, Any] = {}
            extra = "forbid"
            for param in sig.parameters.values():
                if param.name == "self" or param.name in fixed or param.name in self.runtime_args:
                    continue
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    extra = "allow"
                    continue
                if param.kind is inspect.Parameter.VAR_POSITIONAL:
                    continue
                annotation = hints.get(param.name, Any)
                default = defaults.get(param.name, param.default)
                if default is inspect.Parameter.empty:
                    default = ...
                fields[param.name] = (annotation, default)
            self._param_models[name] = create_model(
                f"{name}Params",
                __config__=ConfigDict(
                    extra=extra,
                    arbitrary_types_allowed=True,
                    strict=False,
                    coerce_numbers_to_str=True,  # `image_root=2024` is a folder's name
                    # A NaN margin or an inf scale trains to NaN losses; no setting means either.
                    allow_inf_nan=False,
                ),
                __validators__={
                    "refuse_bool_as_number": field_validator("*", mode="before")(
                        refuse_bool_as_number
                    ),
                    "switch_words_are_switches": field_validator("*", mode="before")(
                        switch_words_are_switches
                    ),
                    "null_is_default": field_validator("*", mode="before")(null_is_default),
                },
                **fields,
            )
        return self._param_models[name]

    def validate(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """Check `params` against the constructor; raise ConfigError naming the bad key.

        A constructor with a `check_params(**params)` (a rule between its parameters,
        which the signature cannot say) has it called too, so that a config that breaks
        the rule is refused when it loads, not when the component is built. It raises
        ValueError('<param>: <problem>'). A preset's constructor checks the preset's
        arguments with those it fixes, which a config may give only at the preset's values."""
        model = self.params_model(name)
        entry = self.get(name)
        ctor, fixed = (entry.ctor, entry.fixed) if isinstance(entry, Variant) else (entry, {})
        # An argument a preset fixes may be given at its value (`variant: lite0`).
        params = {
            key: value
            for key, value in params.items()
            if key not in fixed or _as_yaml(fixed[key]) != value
        }
        try:
            validated = model.model_validate(params)
        except ValidationError as exc:
            # Why a key is not taken, where the component says (`unknown_key_notes`: the
            # settings of the components it is most often swapped for), or a preset fixes it.
            notes = {**getattr(ctor, "unknown_key_notes", {})}
            notes.update(
                (key, self._fixed_note(entry, key, params[key]))
                for key in fixed.keys() & params.keys()
            )
            notes.update(
                (key, note)
                for key in params.keys() - model.model_fields.keys() - notes.keys()
                if key not in PADDLECLAS_PARAMS and (note := self._elsewhere_note(name, key))
            )
            raise ConfigError(
                format_validation_error(exc, model, what=f"{self.kind} '{name}'", notes=notes)
            ) from None
        # A preset is checked as its constructor is, with the arguments it fixes.
        check_params = getattr(ctor, "check_params", None)
        if check_params is not None:
            try:
                check_params(**{**dict(validated), **fixed})
            except ValueError as exc:
                raise ConfigError(f"{exc} in {self.kind} '{name}'") from None
        return validated.model_dump(exclude_unset=True)

    def _elsewhere_note(self, name: str, key: str) -> str | None:
        """Why `name` takes no `key` that other components of this kind take (FC's `bias`
        left in a head that -o renamed ArcMargin, said to be an 'unknown key' as a typo
        is): which take it, and how to drop it; None where none does."""
        takers = [
            other
            for other in self._entries
            if other != name and key in self.params_model(other).model_fields
        ]
        if not takers:
            return None
        return (
            f"a setting of {first_few(takers, 3)}, not of {self.kind} {name}: remove it, or "
            "set it null where -o changed the name"
        )

    def _fixed_note(self, preset: Variant, key: str, value: Any) -> str:
        """Why `preset` takes no `key` at another value than its own, and which presets
        of its constructor have `value` there."""
        others = [
            other
            for other, entry in self._entries.items()
            if isinstance(entry, Variant)
            and entry.ctor is preset.ctor
            and key in entry.fixed
            and _as_yaml(entry.fixed[key]) == value
        ]
        own = json.dumps(_as_yaml(preset.fixed[key]))
        offer = f" ({json.dumps(_as_yaml(value))} in {', '.join(others)})" if others else ""
        return f"fixed at {own} by this preset{offer}"

    def build(self, name: str, **params: Any) -> Any:
        return self._construct(name, self.validate(name, params))

    def build_with_runtime(self, name: str, params: dict[str, Any], **runtime: Any) -> Any:
        """Build from config `params` (validated) plus `runtime_args` supplied by the code."""
        unknown = set(runtime) - self.runtime_args
        if unknown:
            raise TypeError(f"not runtime arguments of {self.kind}s: {', '.join(sorted(unknown))}")
        return self._construct(name, {**self.validate(name, params), **runtime})

    def _construct(self, name: str, arguments: dict[str, Any]) -> Any:
        """Call the constructor; a value it rejects (its checks raise ValueError) is a
        config error naming the component. The original stays chained as the cause
        (`shitu -v` prints it), for the ValueError that is a bug rather than a check."""
        try:
            return self.get(name)(**arguments)
        except UnicodeError:  # a file's encoding, not a config value
            raise
        except ValueError as exc:
            raise ConfigError(f"{self.kind} '{name}': {exc}") from exc


def _as_yaml(value: Any) -> Any:
    """`value` as a config gives it: a tuple (a preset's ResNet layers) is a list."""
    if isinstance(value, tuple | list):
        return [_as_yaml(item) for item in value]
    return value


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn, include_extras=True)  # keeps Size's bound
    except Exception:  # unresolvable forward references: validate those params as Any
        return {}


SHOWN_PROBLEMS = 10
PROBLEM_INDENT = "  "


def format_validation_error(
    exc: ValidationError,
    model: type[BaseModel],
    what: str,
    notes: Mapping[str, str] | None = None,
) -> str:
    """The pydantic errors, each starting with its dotted key path: one line for one, else a
    '<N> problems in WHAT:' line and an indented line each (the first SHOWN_PROBLEMS), so
    that fixing one does not merely uncover the next. `notes` say why a top-level key is
    not taken, in place of 'unknown key'."""
    suggested = {}  # unknown key -> the known key it is most like
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            known = _fields_at(model, error["loc"][:-1])
            close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
            suggested[error["loc"]] = close[0] if close else None
    # A misspelt key shows up both as unknown and as missing: the unknown one explains both.
    explained = {(*loc[:-1], close) for loc, close in suggested.items() if close}
    errors = [e for e in exc.errors() if not (e["type"] == "missing" and e["loc"] in explained)]
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    problems = [_problem(error, suggested, notes or {}, model) for error in errors[:SHOWN_PROBLEMS]]
    if len(errors) == 1:
        return f"{problems[0]} in {what}"
    return problem_list(len(errors), what, problems)


def problem_list(count: int, what: str, problems: list[str]) -> str:
    """'<count> problems in WHAT:' and an indented line for each of the first SHOWN_PROBLEMS
    `problems` (of `count` in all)."""
    shown = f" (the first {SHOWN_PROBLEMS})" if count > SHOWN_PROBLEMS else ""
    lines = [f"{count} problems in {what}{shown}:"]
    return "\n".join(lines + [PROBLEM_INDENT + problem for problem in problems[:SHOWN_PROBLEMS]])


def each_problem(message: str, edit: Callable[[str], str]) -> str:
    """`message` (as `format_validation_error` writes it) with `edit` applied to each problem,
    for callers that add where a key is (a section, a file, an override)."""
    header, *problems = message.split("\n")
    if not problems:
        return edit(header)
    return "\n".join([header, *(PROBLEM_INDENT + edit(p.strip()) for p in problems)])


# Parameters of PaddleClas components (and sections of its configs) that shitu takes in
# another form: the unknown-key error for one says which, so that a config brought from
# PaddleClas is quick to adapt. By name, or by dotted path for a key that is PaddleClas's
# in one section only (a `class_num` elsewhere is a misplaced setting of shitu's).
PADDLECLAS_PARAMS = {
    "Global.class_num": "PaddleClas's classifier size for its classification configs; "
    "shitu's is Arch.Head.class_num",
    "AMP": "PaddleClas's mixed precision; shitu's is Global.amp: bf16 or fp16",
    "weight_attr": "PaddleClas's weight initialiser; shitu's FC head takes init_std",
    "bias_attr": "PaddleClas's bias settings; shitu's BNNeck takes bias_frozen, its FC head bias",
    "use_ssld": "PaddleClas's choice of weights to download; shitu downloads none: convert "
    "them with `shitu convert` and give the file as Global.pretrained_model",
    "one_dim_param_no_weight_decay": "PaddleClas's switch; shitu never decays one-dimensional "
    "parameters (norms, biases) unless Optimizer.decay_norm_and_bias is true",
    "multi_precision": "PaddleClas's float32 master weights for fp16; shitu's weights stay "
    "float32 under Global.amp",
    "by_epoch": "PaddleClas's per-epoch stepping; shitu's schedules change the rate every step",
    "Infer": "PaddleClas's tools/infer.py settings; shitu's inference takes the preprocessing "
    "`shitu export` records beside the model (DataLoader.Eval's), so remove the section",
}


def _problem(
    error: Any,
    suggested: dict[tuple[Any, ...], str | None],
    notes: Mapping[str, str],
    model: type[BaseModel],
) -> str:
    """`dotted.key: what is wrong` for one pydantic error."""
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "model_type":  # pydantic names its class ("instance of GlobalConfig")
        given = error.get("input")
        if isinstance(given, str) and "name" in _fields_at(model, error["loc"]):
            return f"{key}: a component is a mapping, {{name: {given}, ...}} (got {given!r})"
        return f"{key}: should be a mapping of its keys (got {given!r})"
    if error["type"] == "extra_forbidden":
        close = suggested[error["loc"]]
        if key in notes:
            return f"{key}: {notes[key]}"
        paddleclas = PADDLECLAS_PARAMS.get(key) or PADDLECLAS_PARAMS.get(str(error["loc"][-1]))
        if paddleclas:
            return f"{key}: unknown key ({paddleclas})"
        return f"{key}: unknown key" + (f" (did you mean '{close}'?)" if close else "")
    if error["type"] == "missing":
        return f"{key}: required key missing"
    if error["type"] == "null_for_required":
        return f"{key}: {error['msg']}"
    # A validator's own words, without pydantic's "Value error, " before them
    why = error["ctx"]["error"] if error["type"] == "value_error" else error["msg"]
    if error["type"] == "value_error" and isinstance(error.get("input"), dict):
        # a rule between a section's keys, which its words name: the section is noise
        return f"{key}: {why}"
    return f"{key}: {why} (got {error.get('input')!r})"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) pydantic model that `loc` points into."""
    current: Any = model
    for part in loc:
        if not (inspect.isclass(current) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if inspect.isclass(current) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as `Foo | None`, else the annotation."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if inspect.isclass(arg) and issubclass(arg, BaseModel):
            return arg
    return annotation


def import_submodules(package_name: str) -> None:
    """Import a module, or every module of a package, so their @register decorators run."""
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
LOSSES = Registry("loss")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
SAMPLERS = Registry("sampler", runtime_args=("dataset", "num_replicas", "rank", "seed"))
LR_SCHEDULES = Registry(
    "learning-rate schedule", runtime_args=("steps_per_epoch", "epochs", "stage")
)

_COMPONENT_PACKAGES = (
    "shitu.models.backbones",
    "shitu.models.necks",
    "shitu.models.heads",
    "shitu.losses",
    "shitu.data.datasets",
    "shitu.data.transforms",
    "shitu.data.samplers",
    "shitu.engine.lr",
)


def populate() -> None:
    """Import every component module so that all registries are complete."""
    for package in _COMPONENT_PACKAGES:
        import_submodules(package)
