"""Read a YAML config, apply overrides, and validate it into a `ShituConfig`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shitu import registry
from shitu.config.overrides import apply_attributed, load_yaml
from shitu.config.schema import ComponentConfig, DataSplitConfig, ShituConfig
from shitu.errors import ConfigError, did_you_mean
from shitu.fileio import SAVE_AS_UTF8, read_text, special_kind
from shitu.image_files import IMAGE_SUFFIXES
from shitu.registry import each_problem, format_validation_error, problem_list

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"
# The shipped pipeline configs (shitu.pipeline's PIPELINE_CONFIG_DIR): named to a training
# command by mistake, they are refused as what they are.
SHIPPED_PIPELINE_DIR = SHIPPED_DIR / "pipeline"


def shipped_configs(shipped_dir: Path = SHIPPED_DIR) -> list[str]:
    """Names of the configs that ship inside the package (in `shipped_dir`)."""
    return sorted(p.stem for p in shipped_dir.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to an existing file, or the name of a shipped config (with or without .yaml)."""
    return find_config(name_or_path, SHIPPED_DIR, "config file")


def find_config(name_or_path: str | Path, shipped_dir: Path, what: str) -> Path:
    """An existing file, or the name of a YAML file in `shipped_dir` (with or without .yaml)."""
    if not str(name_or_path).strip():  # `-c "$CONFIG"` with the variable unset: not `.`
        names = shipped_configs(shipped_dir)
        raise ConfigError(
            f"{what}: an empty name; give a YAML file or a shipped name: {', '.join(names)}"
        )
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_dir / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        local = Path(shipped.name)
        if local.is_file():  # a copy of it made here (and edited) would be left unread
            raise ConfigError(
                f"{what} {name_or_path}: names the shipped {shipped.stem}, and {local} in this "
                f"folder has that name too; give -c ./{local} for that file, or -c "
                f"{shipped} for the shipped one"
            )
        return shipped
    if path.is_dir():
        raise ConfigError(f"{what} {name_or_path}: a folder, not a YAML file")
    if path.exists() and not path.is_file():  # a FIFO, a device: it exists, so no "not found"
        raise ConfigError(f"{what} {name_or_path}: {special_kind(path.stat())}, not a YAML file")
    # A relative path is looked up in the folder the command runs in: say which.
    looked_for, hint = f"no such file: {path.absolute()}", ""
    if path.parent == Path("."):
        names = shipped_configs(shipped_dir)
        looked_for += f", nor a shipped name: {', '.join(names)}"
        hint = did_you_mean(path.stem, names)
    raise ConfigError(f"{what} not found: {name_or_path}{hint} ({looked_for})")


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> ShituConfig:
    """Load, override and validate a config.

    Every problem is a ConfigError naming the file and the key, a line per problem.
    """
    try:
        path = resolve_config_path(name_or_path)
    except ConfigError as missing:  # `-c inference_general`: refused below as what it is
        try:
            path = find_config(name_or_path, SHIPPED_PIPELINE_DIR, "pipeline config")
        except ConfigError:
            raise missing from None
    raw = read_yaml(path)
    if "IndexProcess" in raw and "Arch" not in raw:  # else a list of each of its keys, unknown
        raise ConfigError(
            f"{name_or_path}: a recognition pipeline config (its IndexProcess section), which "
            "`shitu recognize -c` reads (and serve, eval-pipeline and demo); this command takes "
            "a training config (Global, Arch, Loss, ...): a YAML file or a shipped name "
            f"({', '.join(shipped_configs())})"
        )
    attribution = apply_attributed_overrides(raw, overrides, path)
    try:
        config = ShituConfig.model_validate(raw)
        _validate_components(config)
    except ValidationError as exc:
        message = format_validation_error(exc, ShituConfig, what="the config")
        raise ConfigError(with_source(path, message, attribution)) from None
    except ConfigError as exc:
        raise ConfigError(with_source(path, str(exc), attribution)) from None
    return config


def apply_attributed_overrides(
    raw: dict[str, Any], overrides: list[str] | None, source: Path | str
) -> dict[str, str]:
    """Apply `-o` overrides to `raw`; returns dotted key -> override text for `with_source`.

    A malformed override is a ConfigError naming `source`; so is one string given for the
    list, which would otherwise be read as overrides of one character each.
    """
    if isinstance(overrides, str):
        raise ConfigError(
            f"{source}: overrides: expected a list of 'KEY=VALUE' strings, got the string "
            f"{overrides!r}; pass [{overrides!r}]"
        )
    if isinstance(overrides, Mapping):  # else each key was read as a malformed override
        pairs = [f"{key}={value}" for key, value in overrides.items()]
        raise ConfigError(
            f"{source}: overrides: expected a list of 'KEY=VALUE' strings, got a "
            f"{type(overrides).__name__}; pass {pairs!r}"
        )
    overrides = list(overrides or [])
    for override in overrides:  # else an AttributeError inside the parsing
        if not isinstance(override, str):
            raise ConfigError(
                f"{source}: overrides: expected 'KEY=VALUE' strings, got "
                f"{type(override).__name__} {override!r}"
            )
    try:
        return apply_attributed(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's YAML mapping, from UTF-8 or UTF-16 text as label files are read
    (PowerShell 5's `>` writes UTF-16)."""
    try:
        text = read_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        if path.suffix.lower() in IMAGE_SUFFIXES:  # no re-saving makes it text
            raise ConfigError(f"{path}: an image, not a YAML config") from None
        raise ConfigError(
            f"{path}: not a YAML config (not UTF-8 text, nor UTF-16 with its BOM); {SAVE_AS_UTF8}"
        ) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:  # a file written empty, or with comments alone
        raise ConfigError(f"{path}: the file is empty (a config is a mapping of sections)")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (Global, Arch, ...)"
        )
    return _unaliased(data)


def _unaliased(node: Any) -> Any:
    """A copy of a loaded YAML tree in which each alias (`*normalize`) is a copy of its own.

    PyYAML hands every alias of an anchor the same object, so an `-o` override of one
    place (the training NormalizeImage) would change all others too (evaluation's).
    """
    if isinstance(node, dict):
        return {key: _unaliased(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unaliased(item) for item in node]
    return node


def _validate_components(config: ShituConfig) -> None:
    """Check each component section against its constructor. The problems of all of them
    are raised together (one component's alone as that component words them), so that
    fixing one section's does not merely uncover the next section's. Imports the components
    (torch among them): this module stays light for the pipeline's config and the model's
    preprocessing, which import it."""
    from shitu.evaluation.retrieval import RetrievalEvaluator

    registry.populate()
    failed: list[ConfigError] = []
    _check_component_sections(config, failed)
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise ConfigError(_joined_problems(failed))
    # Built as training and `shitu eval` build it, so that a wrong entry names the file now.
    RetrievalEvaluator.from_metric_config(
        config.Metric.Eval if config.Metric else None, re_ranking=config.Global.re_ranking
    )
    if config.Optimizer is not None:
        _check_schedule_is_evaluated(config.Optimizer.lr.name, config)
    _check_evaluated_features_are_exported(config)


def _check_component_sections(config: ShituConfig, failed: list[ConfigError]) -> None:
    """Validate each component section, adding the error of each one that fails to `failed`."""
    from shitu.losses.combined import split_loss_params

    arch = config.Arch
    sections: list[tuple[str, registry.Registry, ComponentConfig | None]] = [
        ("Arch.Backbone", registry.BACKBONES, arch.Backbone),
        ("Arch.Neck", registry.NECKS, arch.Neck),
        ("Arch.Head", registry.HEADS, arch.Head),
    ]
    for where, reg, component in sections:
        if component is not None:
            _check(failed, where, lambda reg=reg, c=component: reg.validate(c.name, c.params))
    if config.Loss is not None:
        for split, items in (("Train", config.Loss.Train), ("Eval", config.Loss.Eval)):
            for index, item in enumerate(items):
                ((name, params),) = item.items()
                where = f"Loss.{split}.{index}.{name}"
                # `weight` and `input_key` belong to the combiner (checked as they are
                # split off), the rest to the loss.
                _check(
                    failed,
                    where,
                    lambda n=name, p=params: registry.LOSSES.validate(n, split_loss_params(p)[1]),
                )
        _check_something_to_learn(config.Loss.Train, config.LinearProbe is not None, failed)
    if config.DataLoader is not None:
        splits = {"Train": config.DataLoader.Train}
        if config.DataLoader.Eval is not None:
            splits |= {"Eval.Query": config.DataLoader.Eval.Query}
            splits |= {"Eval.Gallery": config.DataLoader.Eval.Gallery}
        for split_name, split in splits.items():
            if split is not None:
                _validate_data_split(f"DataLoader.{split_name}", split, failed)
    if config.Optimizer is not None:
        lr = config.Optimizer.lr
        schedule_params = {"learning_rate": lr.learning_rate, "warmup_epoch": lr.warmup_epoch}
        _check(
            failed,
            "Optimizer.lr",
            lambda: registry.LR_SCHEDULES.validate(lr.name, {**schedule_params, **lr.params}),
        )


def _check_something_to_learn(
    items: list[dict[str, dict[str, Any]]], probed: bool, failed: list[ConfigError]
) -> None:
    """A weight of 0 leaves a loss out: with all of Loss.Train left out the total is always
    0, and a run trains for hours without changing the model (weight decay aside). A
    LinearProbe's probe also leaves out the losses that need a trainable backbone (feature
    distillation); with nothing else it failed with 'list at least one loss', a list the
    config has, or learnt nothing. `items`: Loss.Train; `probed`: whether a probe runs."""
    weighted = [
        name
        for item in items
        for name, params in item.items()
        if (params or {}).get("weight", 1.0) != 0
    ]
    if items and not weighted:
        failed.append(
            ConfigError(
                "Loss.Train: every loss has weight 0, so nothing is learnt; give one a weight"
            )
        )
        return
    needs_backbone = [
        name
        for name in weighted
        if name in registry.LOSSES
        and getattr(registry.LOSSES.get(name), "needs_trainable_backbone", False)
    ]
    if probed and weighted and needs_backbone == weighted:
        failed.append(
            ConfigError(
                f"LinearProbe: the probe leaves out {', '.join(dict.fromkeys(needs_backbone))} "
                "(nothing to learn while the backbone is frozen) and no other loss of "
                "Loss.Train has a weight, so the probe would learn nothing; give another loss "
                "a weight, or drop LinearProbe"
            )
        )


def _check_schedule_is_evaluated(schedule: str, config: ShituConfig) -> None:
    """A schedule driven by evaluations (ReduceOnPlateau) in a run that never evaluates
    would keep its starting rate to the end, silently."""
    if not registry.LR_SCHEDULES.get(schedule).needs_evaluation:
        return
    data, settings = config.DataLoader, config.Global
    if data is None or data.Train is None:
        return  # not a training config (training refuses it, and says why)
    if not settings.eval_during_train:
        reason = "Global.eval_during_train is false"
    elif data.Eval is None:
        reason = "it has no DataLoader.Eval"
    elif (unreached := settings.unreached_eval_interval()) is not None:
        reason = unreached
    else:
        return
    raise ConfigError(
        f"Optimizer.lr.name: {schedule} lowers the rate when Global.eval_metric stops "
        f"improving, but the run never evaluates ({reason}); evaluate during training or "
        "choose another schedule"
    )


def _check_evaluated_features_are_exported(config: ShituConfig) -> None:
    """Evaluation (`shitu eval`, and the best_model a training run keeps) scores
    Global.retrieval_feature_from, `shitu export` ships Arch.infer_output_key: with a neck
    they are different vectors, and the deployed one would be one nobody evaluated."""
    key, exported = config.Global.retrieval_feature_from, config.Arch.infer_output_key
    evaluated = config.DataLoader is not None and config.DataLoader.Eval is not None
    if key == exported or config.Arch.Neck is None or not evaluated:
        return
    raise ConfigError(
        f"Global.retrieval_feature_from: evaluation scores the '{key}' features, but "
        f"Arch.infer_output_key '{exported}' is what `shitu export` ships; set both to the "
        "same key"
    )


def _validate_data_split(where: str, split: DataSplitConfig, failed: list[ConfigError]) -> None:
    from shitu.data.transforms import build_transforms  # a component: see _validate_components

    problems_before = len(failed)
    dataset = split.dataset
    _check(
        failed, f"{where}.dataset", lambda: registry.DATASETS.validate(dataset.name, dataset.params)
    )
    ops = dataset.params.get("transform_ops")
    for index, op in enumerate(ops if isinstance(ops, list) else []):
        if not isinstance(op, dict) or not all(
            isinstance(params, dict | None) for params in op.values()
        ):
            continue  # the dataset's own validation names it
        if len(op) != 1:
            failed.append(
                ConfigError(
                    f"{where}.dataset.transform_ops.{index}: each op must be one "
                    f"'{{OpName: {{params}}}}' mapping, got {len(op)}: {', '.join(map(str, op))}"
                )
            )
            continue
        ((name, params),) = op.items()
        _check(
            failed,
            f"{where}.dataset.transform_ops.{index}.{name}",
            lambda n=name, p=params: registry.TRANSFORMS.validate(n, p or {}),
        )
    if ops and len(failed) == problems_before:  # each op right: then their order (no resize
        try:  # after NormalizeImage), which the dataset would find only once it is built
            transforms = build_transforms(ops, where=f"{where}.dataset.transform_ops")
        except ConfigError as exc:
            failed.append(exc)
        else:
            _check_some_size_goes_through(transforms, f"{where}.dataset.transform_ops", failed)
    if split.sampler is not None:
        sampler = split.sampler
        _check(
            failed,
            f"{where}.sampler",
            lambda: registry.SAMPLERS.validate(sampler.name, sampler.params),
        )


# A square image larger than any photo: one the ops refuse, they refuse whatever the size.
_ANY_SIZE = 1 << 20


def _check_some_size_goes_through(transforms: Any, where: str, failed: list[ConfigError]) -> None:
    """Ops that no image can go through (a crop larger than the fixed size a ResizeImage
    before it gives): each image failed as it was read, said to be the image's fault ("set
    skip_corrupt: true", "put the image right"), at the first step of a training run."""
    problem = transforms.size_problem(_ANY_SIZE, _ANY_SIZE)
    if problem is not None:
        failed.append(
            ConfigError(
                f"{where}: no image can go through these ops, whatever its size ({problem}, "
                "as the ops before it make every image); make the later op fit what they give"
            )
        )


def _check(failed: list[ConfigError], where: str, validate: Any) -> None:
    """Run a component's `validate`; its error, each problem prefixed by `where`, goes to
    `failed`."""
    try:
        validate()
    except ConfigError as exc:
        # Registry messages start with the parameter path (or 'unknown <kind>'): prefix the section.
        failed.append(
            ConfigError(
                each_problem(
                    str(exc),
                    lambda problem: (
                        f"{where}.{problem}"
                        if not problem.startswith("unknown ")
                        else f"{where}.name: {problem}"
                    ),
                )
            )
        )


def _joined_problems(failed: list[ConfigError]) -> str:
    """The problems of several components as one message: a line each, each naming its
    component ('... in head 'ArcMargin''), as `format_validation_error` words one's."""
    lines: list[str] = []
    count = 0  # beyond the lines where a component's message shows only its first ones
    for error in failed:
        header, *problems = str(error).split("\n")
        counted = re.fullmatch(r"(\d+) problems in (.*?)(?: \(the first \d+\))?:", header)
        if counted is None:  # one problem, its component named in its line
            lines.append(header)
            count += 1
            continue
        count += int(counted.group(1))
        lines.extend(f"{problem.strip()} in {counted.group(2)}" for problem in problems)
    return problem_list(count, "the config", lines)


def with_source(path: Path | str, message: str, attribution: dict[str, str]) -> str:
    """`message` (each problem of which starts with the dotted key at fault) prefixed by the
    config's source, each problem naming the `-o` override that set its key or a section
    around it: the last such to apply, whose value stands (`-o DataLoader.Train={...}
    -o DataLoader.Train.dataset.image_root=null` names the second for image_root)."""

    def attributed(problem: str) -> str:
        key = re.sub(r"\[(\d+)\]", r".\1", problem.split(":", 1)[0])  # Eval[0] -> Eval.0
        for dotted, text in reversed(attribution.items()):
            if key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."):
                return f"{problem} (set by -o {text})"
        return problem

    return f"{path}: {each_problem(message, attributed)}"
