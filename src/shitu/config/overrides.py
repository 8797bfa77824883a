"""`-o Section.key=value` overrides: dotted paths, list indices, YAML-typed values."""

from __future__ import annotations

import re
from typing import Any

import yaml

from shitu.errors import ConfigError, override_word

_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that exponent notation without a dot (`1e-5`, common in
    learning rates) is a number, as in YAML 1.2 and PaddleClas's `-o`; YAML 1.1 makes it
    a string, which the config then rejects or compares as text. A key repeated in one
    mapping is an error: PyYAML would keep the last silently, dropping the first's
    settings (two `Global:` sections)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key '{key_node.value}'",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# As in YAML 1.2's core schema: configs hold no dates (`output_dir: 2024-01-01`, a run's
# folder, stays text), and only true and false are booleans. YAML 1.1 also reads yes, no,
# on, off, y and n so, which turned a folder or label of that name (`-o Global.output_dir=on`,
# `index_dir: no`) into a boolean that a text key refused; a boolean key still takes them,
# as pydantic reads that text as true or false. Nor are a number with a leading zero or
# colons an integer: YAML 1.1 reads `010` as octal 8 and `12:30` as base 60 (750), which a
# text key then took as the folder `8` or `750`; such text stays as typed, and a number key
# reads `010` as 10.
# YAML 1.1's resolvers left out; the bool and int ones are replaced below.
_YAML_1_1_RULES = ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_1_1_RULES]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0b[01_]+)$"),
    list("-+0123456789"),
)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (a config file or an override's value) with `YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """Split 'A.b[0].c=value' into (['A', 'b', 0, 'c'], parsed value).

    The value is parsed as YAML, so `3` is an int, `1e-5` a float, `[1, 2]` a list,
    `null` None and `true` a bool; anything else stays a string, except a value opening a
    list or mapping (`[` or `{`) that is not valid YAML (a bracket left open, say): that is
    refused naming the YAML problem, as it would be in a config file, rather than taken
    for text that the key then refuses as "not a valid list". A `~` starting a path
    key's value (`-o Global.output_dir=~/runs`, which the shell leaves as it is) is
    expanded where the config is validated (`ConfigPath`), as in a YAML file; other text
    (a label, a delimiter) is left as written.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form Section.key=value")
    path = _parse_path(key.strip(), text)
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        if raw.lstrip().startswith(("[", "{")):
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"override '{text}': the value is not valid YAML ({problem}); close its "
                "brackets, or quote it to give text"
            ) from None
        value = raw
    return path, value


def _parse_path(key: str, text: str) -> list[str | int]:
    path: list[str | int] = []
    for segment in key.split("."):
        if not segment:
            raise ConfigError(f"override '{text}' has an empty key segment")
        pos = 0
        for match in _TOKEN.finditer(segment):
            if match.start() != pos:
                break
            name, index = match.groups()
            if name is not None:
                path.append(int(name) if name.isdigit() and path else name)
            else:
                path.append(int(index))
            pos = match.end()
        if pos != len(segment):
            raise ConfigError(f"override '{text}': cannot parse key segment '{segment}'")
    return path


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply overrides in order to a raw config dict (in place) and return it. `KEY=null`
    removes a KEY the dict has, so that its default applies."""
    apply_attributed(config, overrides)
    return config


def apply_attributed(config: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """`apply_overrides`, returning dotted key -> override text as `override_paths` does,
    except that an override into a section the config lacks (`-o LinearProbe.epochs=2`)
    has the section it makes: the section's problems (a key it requires) are the
    override's, not the file's."""
    result: dict[str, str] = {}
    for text in overrides:
        path, value = parse_override(text)
        made = _set_path(config, path, value, text)
        dotted = ".".join(str(p) for p in path[: made or len(path)])
        result.pop(dotted, None)
        result[dotted] = text
    return result


def _set_path(node: Any, path: list[str | int], value: Any, text: str) -> int | None:
    """Set `path` to `value`; returns the length of the path of the first mapping it had
    to make, None where every mapping on the way was there."""
    made: int | None = None
    parent: Any = None
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(part, int) and isinstance(node, dict):
            # A number under a mapping is a key: `Optimizer.lr_mult.backbone.blocks.0`
            # names the module `backbone.blocks.0`.
            part = str(part)
        if isinstance(part, int):
            if not isinstance(node, list):
                raise ConfigError(f"override '{text}': {_path_str(path[:depth])} is not a list")
            if not -len(node) <= part < len(node):
                raise ConfigError(
                    f"override '{text}': index {part} out of range for "
                    f"{_path_str(path[:depth])} (length {len(node)})"
                )
            if last and value is None:  # null gives a key its default: an item has none
                where = _path_str(path[:depth])
                raise ConfigError(
                    f"override '{text}': a list item cannot be null; to remove it, give "
                    f"the whole list without it (-o {where}=[...])"
                )
            if last:
                node[part] = value
            else:
                parent, node = node, node[part]
        else:
            if isinstance(node, list):
                raise ConfigError(_list_item_not_named(text, path, depth, node))
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': {_path_str(path[:depth])} is not a mapping")
            if isinstance(parent, list) and len(node) == 1 and part not in node:
                _refuse_another_items_name(text, path, depth, parent, node)
            if last and value is None and part in node:
                # As if the file left it out: its default applies, and the config's record
                # (a checkpoint's, an export's manifest) is that of a config without it. A
                # key not there is set to null, which validation gives its default, or
                # refuses as unknown.
                del node[part]
            elif last:
                node[part] = value
            else:
                if node.get(part) is None:  # a new list could hold no index: a mapping
                    node[part] = {}
                    made = made or depth + 1
                parent, node = node, node[part]
    return made


def _refuse_another_items_name(
    text: str, path: list[str | int], depth: int, items: list, item: dict
) -> None:
    """Refuse `path[depth]` into the one-key `item` of `items` (a `{LossName: {params}}`
    list's, say) where another item has that key: `-o Loss.Train.0.TripletLoss.margin=0.3`
    with TripletLoss at 1 added a second loss to item 0, refused as a list item of two.
    The override with the other item's index is offered."""
    found = _items_named(items, path[depth])
    if len(found) == 1:
        raise ConfigError(
            f"override '{text}': {_path_str(path[:depth])} is {next(iter(item))}, and "
            f"{path[depth]} is item {found[0]}: "
            f"-o {_with_path(text, [*path[: depth - 1], found[0], *path[depth:]])}"
        )


def _list_item_not_named(text: str, path: list[str | int], depth: int, items: list) -> str:
    """Why `path[depth]`, a name, cannot go into the list `items` at `path[:depth]`: a list
    item is named by its index (`Loss.Train.0.CELoss.weight`), which `Loss.Train.CELoss.weight`
    leaves out; the override with the index, where one item has that name. It said only
    that the list 'is not a mapping'."""
    where, name = _path_str(path[:depth]), path[depth]
    found = _items_named(items, name)
    if len(found) == 1:
        return (
            f"override '{text}': {where} is a list, whose {name} is item {found[0]}: "
            f"-o {_with_path(text, [*path[:depth], found[0], *path[depth:]])}"
        )
    return (
        f"override '{text}': {where} is a list: name its item by index"
        + (f" ({name} is at {', '.join(map(str, found))})" if found else "")
        + (f", 0 to {len(items) - 1}" if items else " (it is empty)")
    )


def _items_named(items: list, name: str | int) -> list[int]:
    """The indices of the mappings among `items` that have the key `name`."""
    return [index for index, item in enumerate(items) if isinstance(item, dict) and name in item]


def _with_path(text: str, path: list[str | int]) -> str:
    """Override `text` with its key path put right as `path`, as one shell word."""
    return override_word(".".join(map(str, path)), text.partition("=")[2])


def _path_str(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "<root>"


def override_paths(overrides: list[str]) -> dict[str, str]:
    """Dotted path of each override -> its text, to attribute validation errors; in the
    order they apply, a path given twice at its last place (the value that stands)."""
    result: dict[str, str] = {}
    for text in overrides:
        path, _ = parse_override(text)
        dotted = ".".join(str(p) for p in path)
        result.pop(dotted, None)
        result[dotted] = text
    return result
