"""Every `shitu` command line in the docs parses with the real command-line parser.

Commands are taken from README.md, docs/*.md, the model card, the comments at the top of
the shipped configs and the docstrings of benchmarks/*.py: fenced code blocks (backslash
continuations joined, shell variables, `for VAR in ...` loops and brace expansions
expanded) and inline code spans. Each is parsed as `shitu` parses it (`separate_overrides`,
then `build_parser()`); a parse error fails the test with the file, the line and the
command. Then the cheap checks a command makes before any work: each `-o` word is a
KEY=VALUE (not a positional taken by `-o`), overrides fit the training or pipeline config
they name (unless a value is a placeholder such as FILE), `shitu average`'s checks up to
reading the weights (option pairs, -c/-o only with --pretrained-share, a pretrained
backbone to mix in), `index build`'s (--nprobe/--ef-search against --index-type).

Docs write commands in shorthand forms, read as follows:
- a synopsis (`shitu info [-c CONFIG] [-o KEY=VALUE ...]`): every optional part given,
  the first of `A|B` alternatives, placeholders of typed options given a valid value;
- `...` after an option is a value for it (`shitu train -c ...`), elsewhere left out
  (`shitu recognize ... | head -1`), and required arguments may then be missing;
- a command in prose (a code span, not a synopsis) may leave out required arguments
  (`shitu export --score-thres 0.6`); one of options alone (`shitu export --score-thres`)
  is a mention: the command and its options exist.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shitu import checkpoint
from shitu.cli import average as average_cli
from shitu.cli import index as index_cli
from shitu.cli.common import OVERRIDE_FLAGS, output_path, required_path, separate_overrides
from shitu.cli.main import build_parser
from shitu.cli.recognize import pipeline_config_from_args
from shitu.config import load_config
from shitu.errors import ShituError

REPO_ROOT = Path(__file__).resolve().parent.parent

# Doc commands left unchecked, by (file, line where the command starts): the reason. None
# at present: each form the docs use is read as the module docstring says.
SKIPPED: dict[tuple[str, int], str] = {}
# Configs the docs name that are not in the repository: their commands are parsed, but
# their `-o` overrides cannot be checked against the config. Any other unknown -c fails.
UNCHECKED_CONFIGS = {
    "previous.yaml": "the default model's earlier recipe, which the research record says "
    "how to write by hand",
    "my_products.yaml": "the README's fine-tuning example: the user's edited copy of a "
    "shipped config",
}

# What `$(...)` stands for in the docs: the default model's folder (README's int8 export).
COMMAND_SUBSTITUTION = "/path/to/default_model"
# A value for `-c ...` and `-o ...`: any config and a harmless override.
ELIDED_VALUES = {
    "-c": "GroceryStore_EfficientNetLite0",
    "--config": "GroceryStore_EfficientNetLite0",
}
ELIDED_OVERRIDE = "Global.seed=0"
# Values tried for an upper-case placeholder (N, S, STEP) of an option with a type.
PLACEHOLDER_VALUES = ("0.5", "1", "32")
TRAINING_CONFIG_COMMANDS = {"train", "eval", "export", "info", "convert", "average"}
PIPELINE_CONFIG_COMMANDS = {"recognize", "serve", "eval-pipeline", "demo"}


@dataclass
class DocCommand:
    path: str
    line: int
    raw: str  # as written, joined into one line
    inline: bool  # from prose (a code span or a config comment), not from a code block
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: shitu {self.raw}"


# --- extraction -----------------------------------------------------------------------------

COMMAND_START = re.compile(r"(?:^|(?<=[\s;&|(]))(?:[\w./-]*/)?shitu(?=[ \t]+[\w\-\[])")
FENCE = re.compile(r"^\s*```")
SPAN = re.compile(r"`([^`]+)`")
FOR_LOOP = re.compile(r"^\s*for\s+([A-Za-z_]\w*)\s+in\s+(\S+)")
ASSIGNMENT = re.compile(r"^\s*([A-Za-z_]\w*)=")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")
BRACES = re.compile(r"(?<![^\s])([^\s'\"{}]*)\{([^{}\s'\"]*,[^{}\s'\"]*)\}([^\s'\"{}]*)")


def doc_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", REPO_ROOT / "src/shitu/assets/MODEL_CARD.md"]
    files += sorted((REPO_ROOT / "docs").glob("*.md"))
    files += sorted((REPO_ROOT / "src/shitu/configs").rglob("*.yaml"))
    files += sorted((REPO_ROOT / "benchmarks").glob("*.py"))
    return files


def extract_commands(path: Path) -> list[DocCommand]:
    text = path.read_text(encoding="utf-8")
    name = str(path.relative_to(REPO_ROOT))
    if path.suffix == ".yaml":
        return _from_config_comments(name, text)
    if path.suffix == ".py":
        return _from_docstrings(name, text)
    return _from_markdown(name, text)


def _markdown_parts(text: str) -> tuple[list[list[tuple[int, str]]], str]:
    """The fenced code blocks (numbered lines) and the prose, code blocks blanked so that
    spans are found in prose only and keep their line numbers."""
    lines = text.split("\n")
    prose = list(lines)
    blocks: list[list[tuple[int, str]]] = []
    block: list[tuple[int, str]] | None = None
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            prose[number - 1] = ""
        elif block is not None:
            block.append((number, line))
            prose[number - 1] = ""
    return blocks, "\n".join(prose)


def _from_markdown(name: str, text: str) -> list[DocCommand]:
    blocks, prose = _markdown_parts(text)
    env: dict[str, str] = {}  # a file's variables, for the spans that use them too
    commands = []
    for block in blocks:
        commands += _from_code(name, block, env)
    commands += _from_spans(name, prose, 1, env)
    return sorted(commands, key=lambda c: c.line)


def _from_code(name: str, block: list[tuple[int, str]], env: dict[str, str]) -> list[DocCommand]:
    """Commands of a code block; assignments and loop variables go into `env`."""
    commands = []
    for number, line in _logical_lines(block):
        if line.lstrip().startswith("#"):
            continue
        loop = FOR_LOOP.match(line)
        if loop:  # the loop's first value stands for all
            env[loop.group(1)] = loop.group(2).rstrip(";")
            continue
        if ASSIGNMENT.match(line) and "shitu" not in line.split("=", 1)[0]:
            words = shlex.split(_expand(line, env), comments=True)
            if words and ASSIGNMENT.match(words[0]):
                key, value = words[0].split("=", 1)
                env[key] = value
            continue
        for raw in _split_commands(line):
            commands.append(DocCommand(name, number, raw, inline=False, env=dict(env)))
    return commands


def _logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines with backslash continuations and open quotes joined, each with its first line."""
    result: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in block:
        if pending is not None:
            start, text = pending
            line = text + line.lstrip()
            number = start
        continued = line.rstrip().endswith("\\")
        if continued:
            pending = (number, line.rstrip()[:-1].rstrip() + " ")
            continue
        try:
            shlex.split(line, comments=True)
        except ValueError:  # a quote still open: the value goes on on the next line
            pending = (number, line + " ")
            continue
        pending = None
        result.append((number, line))
    if pending is not None:
        result.append(pending)
    return result


def _from_spans(name: str, text: str, first_line: int, env: dict[str, str]) -> list[DocCommand]:
    commands = []
    for match in SPAN.finditer(text):
        line = first_line + text.count("\n", 0, match.start(1))
        span = " ".join(match.group(1).split())
        for raw in _split_commands(span):
            commands.append(DocCommand(name, line, raw, inline=True, env=env))
    return commands


def _from_config_comments(name: str, text: str) -> list[DocCommand]:
    """A config's comments: indented comment lines are commands, the rest prose (code spans,
    and commands written in the text up to the end of their sentence)."""
    header = []
    for line in text.split("\n"):
        start = line.find("#")
        comment = start >= 0 and (start == 0 or line[start - 1].isspace())
        header.append(line[start + 1 :] if comment else "")
    commands = []
    prose = []
    for number, line in enumerate(header, 1):
        if line.startswith("   ") and "shitu" in line:
            commands += [
                DocCommand(name, number, raw, inline=False) for raw in _split_commands(line)
            ]
            prose.append("")
        else:
            prose.append(line)
    joined = "\n".join(prose)
    commands += _from_spans(name, joined, 1, {})
    bare = SPAN.sub(lambda m: " " * len(m.group(0)), joined)  # spans are done
    for match in COMMAND_START.finditer(bare):
        end = re.search(r"[.;)](\s|$)|\)", bare[match.start() :])
        sentence = bare[match.start() : match.start() + (end.start() if end else len(bare))]
        line = 1 + bare.count("\n", 0, match.start())
        commands += [
            DocCommand(name, line, raw, inline=True)
            for raw in _split_commands(" ".join(sentence.split()))
        ]
    return commands


def _from_docstrings(name: str, text: str) -> list[DocCommand]:
    commands = []
    for node in ast.walk(ast.parse(text)):
        kinds = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr):
            value = node.body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                commands += _from_spans(name, value.value, value.lineno, {})
    return commands


def _split_commands(line: str) -> list[str]:
    """The `shitu` commands in a shell line, each from after `shitu` to its end (`&&`, `|`,
    `;`, a comment, or the line's end), as written."""
    found = []
    for match in COMMAND_START.finditer(line):
        rest = line[match.end() :]
        end = len(rest)
        quote = None
        for index, char in enumerate(rest):
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif (
                char in ";&"
                or (char == "|" and not _is_synopsis(rest))  # a synopsis's `A|B` is no pipe
                or (char == "#" and (index == 0 or rest[index - 1].isspace()))
            ):
                end = index
                break
        found.append(rest[:end].strip())
    return found


# --- turning a doc command into argv ---------------------------------------------------------


def _is_synopsis(raw: str) -> bool:
    return bool(re.search(r"(^|\s)\[", raw))


def _expand(text: str, env: dict[str, str]) -> str:
    """`$(...)` as COMMAND_SUBSTITUTION, `$NAME` as its value; unknown names are errors."""
    while "$(" in text:
        start = text.index("$(")
        depth, index, quote = 0, start + 1, None
        while index < len(text):
            char = text[index]
            if quote:
                quote = None if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    break
            index += 1
        text = text[:start] + COMMAND_SUBSTITUTION + text[index + 1 :]

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise ValueError(f"undefined shell variable ${name}")
        return env[name]

    return VARIABLE.sub(value, text)


def _expand_braces(text: str) -> str:
    def words(match: re.Match) -> str:
        head, choices, tail = match.groups()
        return " ".join(f"{head}{choice}{tail}" for choice in choices.split(","))

    return BRACES.sub(words, text)


@dataclass
class Parsed:
    argv: list[str]
    elided: bool  # `...` left out: required arguments may be missing
    mention: bool  # only names a command and its options


def to_argv(command: DocCommand) -> Parsed:
    raw = command.raw
    synopsis = command.inline and _is_synopsis(raw)
    if synopsis:
        raw = re.sub(r"\|--[\w-]+ [^\s\]|]+", "", raw)  # `--coco JSON|--voc DIR`: the first
        raw = re.sub(r"([^\s|\[\]]+)(?:\|[^\s|\[\]]+)+", r"\1", raw)  # `a|b|c`: a
        raw = re.sub(r"(^|\s)\[+", r"\1", raw)
        raw = re.sub(r"\]+(?=\s|$)", "", raw)
    raw = _expand_braces(_expand(raw, command.env))
    words = shlex.split(raw)
    argv: list[str] = []
    elided = False
    for word in words:
        if word == "..." and synopsis:
            continue  # `-o KEY=VALUE ...`: repeatable
        if word == "...":
            previous = argv[-1] if argv else ""
            if previous in OVERRIDE_FLAGS:
                argv.append(ELIDED_OVERRIDE)
            elif previous in ELIDED_VALUES:
                argv.append(ELIDED_VALUES[previous])
            else:
                elided = True
            continue
        if synopsis and word.endswith("...") and word[:-3].isupper():
            word = word[:-3]  # `IMAGES...`: one or more
        argv.append(word)
    # Prose leaves out what it is not about (`shitu export --score-thres 0.6`); a synopsis
    # and a code block give the whole command.
    elided = elided or (command.inline and not synopsis)
    mention = command.inline and all(w.startswith("-") for w in _after_command(argv))
    return Parsed(argv, elided, mention)


def _after_command(argv: list[str]) -> list[str]:
    skip = 2 if argv[:1] == ["index"] else 1
    return argv[skip:]


# --- parsing ---------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    children = list(_subparsers(parser).values())
    if not children:
        return [parser]
    return [leaf for child in children for leaf in _leaf_parsers(child)]


def _relaxed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with no argument of a command required (for elided commands)."""
    for leaf in _leaf_parsers(parser):
        for group in leaf._mutually_exclusive_groups:
            group.required = False
        for action in leaf._actions:
            action.required = False
            if not action.option_strings and action.nargs in (None, "+"):
                action.nargs = "?" if action.nargs is None else "*"
    return parser


def _leaf(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser | None:
    commands = _subparsers(parser)
    if not argv or argv[0] not in commands:
        return None
    leaf = commands[argv[0]]
    if _subparsers(leaf):
        return _subparsers(leaf).get(argv[1]) if len(argv) > 1 else leaf
    return leaf


def _fill_placeholders(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Upper-case placeholders (N, S, STEP) of options with a type: a value it accepts."""
    leaf = _leaf(parser, argv)
    if leaf is None:
        return argv
    result = []
    action = None
    for word in argv:
        if word.startswith("-"):
            action = leaf._option_string_actions.get(word.split("=", 1)[0])
        elif (
            action is not None
            and re.fullmatch(r"[A-Z][A-Z0-9_]*", word)
            and action.type not in (None, str, Path, required_path, output_path)  # any word
        ):
            for candidate in PLACEHOLDER_VALUES:
                try:
                    action.type(candidate)
                except (ValueError, TypeError, argparse.ArgumentTypeError):
                    continue
                word = candidate
                break
        result.append(word)
    return result


class ParseFailure(Exception):
    pass


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argparse's result for `argv` as `shitu` reads it; its error message instead of exiting."""

    def error(message: str) -> None:
        raise ParseFailure(message)

    parsers = [parser, *_subparsers(parser).values()]
    parsers += [p for child in _subparsers(parser).values() for p in _subparsers(child).values()]
    for each in parsers:
        each.error = error  # type: ignore[method-assign]
    try:
        return parser.parse_args(separate_overrides(argv))
    except SystemExit as exc:  # --help, --version
        raise ParseFailure(f"exited with status {exc.code}") from None


def check_mention(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    leaf = _leaf(parser, argv)
    if leaf is None:
        raise ParseFailure(f"no such command: shitu {' '.join(argv[:2])}")
    for flag in _after_command(argv):
        if flag.split("=", 1)[0] not in leaf._option_string_actions:
            raise ParseFailure(f"shitu {' '.join(argv[:1])} has no option {flag}")


# --- the cheap checks of `run` ----------------------------------------------------------------


class ReachedWork(Exception):
    """Raised where a command would start working: every check before it passed."""


def static_checks(args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    overrides = [item for group in getattr(args, "override", None) or [] for item in group]
    for item in overrides:
        if "=" not in item:  # `-o` took a word that is no KEY=VALUE
            raise ShituError(f"-o {item}: not KEY=VALUE")
    placeholder = any(re.search(r"\.\.\.|=[A-Z_]+$|^KEY=", item) for item in overrides)
    if args.command in TRAINING_CONFIG_COMMANDS and not placeholder:
        config = args.config or args.default_config  # the one the command reads without -c
        unchecked = config in UNCHECKED_CONFIGS or _placeholder(config)
        if not unchecked and config is not None:  # None: `average` and `info` without -c
            load_config(config, overrides)
    if args.command in PIPELINE_CONFIG_COMMANDS and not placeholder:
        pipeline_config_from_args(args)  # the config, -o, then --gallery, --detector, ...
    if args.command == "average" and not _placeholder(args.out):
        # Files left out of prose (`shitu average --weighting 1 3`) as two or as weighted;
        # no file is read (empty weights) and none written.
        args.weights = args.weights or ["run.safetensors"] * max(2, len(args.weighting or ()))
        args.out = args.out or "soup.safetensors"
        with monkeypatch.context() as patch:
            # `average` imports the weight functions as it runs: replaced where they live
            patch.setattr(checkpoint, "average_weights", lambda *_: ({}, {}))
            patch.setattr(checkpoint, "read_weights", lambda *_: ({}, {}))
            patch.setattr(average_cli, "model_from_config", _reach_work)
            patch.setattr(checkpoint, "save_weights", _reach_work)
            if _placeholder(args.config):  # `-c CONFIG`
                patch.setattr(average_cli, "config_from_args", _reach_work)
            with pytest.raises(ReachedWork):
                average_cli.run(args)
    if args.command == "index" and args.index_command == "build" and args.out:
        with monkeypatch.context() as patch:
            patch.setattr(index_cli, "check_writable", _reach_work)
            args.out = tmp / "library"
            with pytest.raises(ReachedWork):
                index_cli.run_build(args)
    if args.command == "index" and args.index_command == "rebuild" and args.index_type:
        index_cli._search_options(args, args.index_type)


def _placeholder(value: str | Path | None) -> bool:
    return value is not None and bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", str(value)))


def _reach_work(*_args: object, **_kwargs: object) -> None:
    raise ReachedWork


# --- the tests -------------------------------------------------------------------------------


def all_commands() -> list[DocCommand]:
    return [command for path in doc_files() for command in extract_commands(path)]


def test_extraction_finds_the_commands():
    commands = all_commands()
    files = {command.path for command in commands}
    assert {
        "README.md",
        "docs/default_model_research.md",
        "src/shitu/assets/MODEL_CARD.md",
    } <= files
    assert len(commands) > 100
    # the model card's reproduce loop, its variable and brace expansions
    card = [c for c in commands if c.path.endswith("MODEL_CARD.md") and not c.inline]
    argvs = [to_argv(c).argv for c in card]
    assert [
        "train", "-c", "GroceryStore_EfficientNetLite0", "-o",
        "DataLoader.Train.dataset.cls_label_path=[../shared/datasets/grocery_store/train.txt, "
        "../shared/datasets/grocery_store/val.txt]",
        "Global.seed=0", "Global.eval_during_train=false", "Global.output_dir=output/tv_seed0",
    ] in argvs  # fmt: skip
    assert [
        "average", *(f"output/tv_seed{seed}/final_model.safetensors" for seed in range(4)),
        "--out", "output/soup.safetensors",
    ] in argvs  # fmt: skip


def check(
    command: DocCommand,
    parsers: tuple[argparse.ArgumentParser, argparse.ArgumentParser],
    monkeypatch: pytest.MonkeyPatch,
    tmp: Path,
) -> str | None:
    """Why `command` fails, or None."""
    strict, relaxed = parsers
    try:
        parsed = to_argv(command)
        if parsed.mention:
            check_mention(strict, parsed.argv)
        else:
            parser = relaxed if parsed.elided else strict
            argv = _fill_placeholders(parser, parsed.argv)
            static_checks(parse(parser, argv), monkeypatch, tmp)
    except (ParseFailure, ShituError, ValueError) as exc:
        return f"{command}\n    -> {type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize(
    ("text", "inline", "reason"),
    [
        ("average a.safetensors --outt b.safetensors", False, "required: --out"),
        ("index build --gallery g/", False, "required: --out"),
        ("recognize --gallery LIB", False, "required: images"),
        ("average -c X a.safetensors b.safetensors --out c.safetensors", False, "-c and -o"),
        ("average a.pt --weighting 1 --out c.safetensors", False, "two or more"),
        ("average --pretrained-share 0.1 --layers backbone.head", True, "needs -c CONFIG"),
        ("index build --gallery g/ --out lib --nprobe 8", False, "--nprobe: only with"),
        ("index build --gallery g/ --out lib --index-type IVF --ef-search 8", False, "HNSW32"),
        ("recognize -o photo.jpg shelf.jpg --gallery LIB", False, "not KEY=VALUE"),
        ("train -o Global.epochs=2 Global.no_such_key=1", False, "no_such_key"),
        ("export --score-thres 2", True, "from -1 to 1"),
        ("export --scorethres", True, "has no option --scorethres"),
        ("index rebuild --nprobe 8 --index-type HNSW32", True, "--nprobe: only with"),
        ("[-c CONFIG] recognize", True, "invalid choice"),
        ("eval -c GroceryStore_Lite0 -o Global.amp=off", False, "config file not found"),
        ("recognize a.jpg -o IndexProcess.score_thres=2", False, "score_thres"),
    ],
)
def test_a_failing_command_is_named(monkeypatch, tmp_path, text, inline, reason):
    parsers = build_parser(), _relaxed(build_parser())
    failure = check(DocCommand("x.md", 7, text, inline), parsers, monkeypatch, tmp_path)
    assert failure is not None and failure.startswith(f"x.md:7: shitu {text}")
    assert reason in failure


def test_doc_commands_parse(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    parsers = build_parser(), _relaxed(build_parser())
    failures = []
    checked = 0
    for command in all_commands():
        if (command.path, command.line) in SKIPPED:
            continue
        failure = check(command, parsers, monkeypatch, tmp_path)
        if failure:
            failures.append(failure)
        checked += 1
    assert not failures, f"{len(failures)} doc commands fail:\n" + "\n".join(failures)
    assert checked > 100


# --- benchmark commands ----------------------------------------------------------------------

BENCHMARKS = REPO_ROOT / "benchmarks"
BENCHMARK_COMMAND = re.compile(r"python (benchmarks/\w+\.py)([^|;&#`]*)")
# Run in a child with the benchmarks' folder on its path: each script's own parser reads
# each command line given on stdin (JSON [script, words]), and the script stops there.
PARSE_ONLY = """
import argparse, contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
class Parsed(Exception):
    pass
def parse_only(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed
parse_args = argparse.ArgumentParser.parse_args
argparse.ArgumentParser.parse_args = parse_only
failures = []
for script, words in json.load(sys.stdin):
    sys.argv = [script, *words]
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            runpy.run_path(script, run_name="__main__")
        failures.append([script, words, "ran without parsing its arguments"])
    except Parsed:
        pass
    except SystemExit:
        failures.append([script, words, said.getvalue().strip().splitlines()[-1]])
print(json.dumps(failures))
"""


def benchmark_commands() -> list[tuple[str, int, str, list[str]]]:
    """(file, line, script, words) of each `python benchmarks/NAME.py ...` in the Markdown
    docs, in code blocks (continuations joined) and prose code spans; `...` left out."""
    found = []
    for path in doc_files():
        if path.suffix != ".md":
            continue
        name = str(path.relative_to(REPO_ROOT))
        blocks, prose = _markdown_parts(path.read_text(encoding="utf-8"))
        lines = [line for block in blocks for line in _logical_lines(block)]
        for span in SPAN.finditer(prose):
            lines.append((1 + prose.count("\n", 0, span.start()), " ".join(span[1].split())))
        for number, line in lines:
            for match in BENCHMARK_COMMAND.finditer(line):
                words = [word for word in shlex.split(match[2]) if word != "..."]
                found.append((name, number, match[1], words))
    return found


def test_doc_benchmark_commands_parse():
    """Every benchmark command the docs give runs the script they name with options it
    takes, and every benchmark script (one that reads a command line) is given there."""
    commands = benchmark_commands()
    runnable = {
        f"benchmarks/{script.name}"
        for script in BENCHMARKS.glob("*.py")
        if "benchmark_parser(__doc__)" in script.read_text()
    }
    named = {script for _, _, script, _ in commands}
    assert named <= runnable, f"no such benchmark: {sorted(named - runnable)}"
    assert runnable <= named, f"benchmarks no doc runs: {sorted(runnable - named)}"
    child = subprocess.run(
        [sys.executable, "-c", PARSE_ONLY, str(BENCHMARKS)],
        input=json.dumps([[script, words] for _, _, script, words in commands]),
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    failures = json.loads(child.stdout)
    assert not failures, "\n".join(
        f"{path}:{line}: python {script} {' '.join(words)}\n    -> {reason}"
        for (path, line, script, words) in commands
        for (failed_script, failed_words, reason) in failures
        if [script, words] == [failed_script, failed_words]
    )
