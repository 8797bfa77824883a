"""The benchmarks' shared command line: a whole description and every default in --help."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _keep_the_excepthook(monkeypatch):
    """`benchmark_parser` installs the scripts' excepthook: not pytest's process's."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)


def _arguments():
    spec = importlib.util.spec_from_file_location("arguments", BENCHMARKS / "arguments.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _benchmark_parser():
    return _arguments().benchmark_parser


DOC = """What this benchmark measures, in a first paragraph
that wraps onto a second line.

Details that --help leaves to the script's docstring.
"""


def test_description_is_the_whole_first_paragraph() -> None:
    parser = _benchmark_parser()(DOC)
    assert parser.description == (
        "What this benchmark measures, in a first paragraph that wraps onto a second line."
    )
    assert "Details" not in parser.format_help()


def test_help_shows_defaults_zero_and_lists_included() -> None:
    parser = _benchmark_parser()(DOC)
    parser.add_argument("--seed", type=int, default=0, help="drawing seed")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--work", help="keep files here")
    parser.add_argument("--threads", type=int, help="threads (default: all)")
    parser.add_argument("--onnx", action="append", default=[], help="extra detectors")
    parser.add_argument("--torch", action="store_true", help="also time torch")
    text = " ".join(parser.format_help().split())
    assert "extra detectors --torch" in text  # no "(default: )"
    assert "drawing seed (default: 0)" in text
    assert "batch sizes (default: 1 32)" in text
    assert "keep files here --threads" in text  # no "(default: None)"
    assert "threads (default: all) --onnx" in text  # not said twice
    assert text.endswith("also time torch")


def test_every_benchmark_option_has_help() -> None:
    """Each script builds its parser with `benchmark_parser` and says what each option is."""
    missing = []
    for script in sorted(BENCHMARKS.glob("*.py")):
        tree = ast.parse(script.read_text())
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
        options = [
            call
            for call in calls
            if isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"
        ]
        if not options or script.name == "arguments.py":
            continue
        if not any(isinstance(c.func, ast.Name) and c.func.id == "benchmark_parser" for c in calls):
            missing.append(f"{script.name}: parser not from benchmark_parser")
        for option in options:
            if not any(keyword.arg == "help" for keyword in option.keywords):
                missing.append(f"{script.name}: {ast.literal_eval(option.args[-1])}")
    assert missing == []


def test_a_count_of_zero_is_a_usage_error(capsys) -> None:
    """`--rounds 0` took the median of nothing, `--repeats 0` divided by zero: tracebacks."""
    arguments = _arguments()
    parser = arguments.benchmark_parser(DOC)
    parser.add_argument("--rounds", type=arguments.count, default=3, help="timing rounds")
    assert parser.parse_args(["--rounds", "2"]).rounds == 2
    for given in ("0", "-1", "1.5"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--rounds", given])
        assert f"expected a whole number >= 1, got '{given}'" in capsys.readouterr().err


def options_typed(type_name: str) -> list[str]:
    """'SCRIPT: --option' for each benchmark option that parses with the builtin `type_name`
    (`type=int`), unchecked."""
    plain = []
    for script in sorted(BENCHMARKS.glob("*.py")):
        for call in ast.walk(ast.parse(script.read_text())):
            if not (
                isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "add_argument"
            ):
                continue
            kinds = [k.value for k in call.keywords if k.arg == "type"]
            if kinds and isinstance(kinds[0], ast.Name) and kinds[0].id == type_name:
                plain.append(f"{script.name}: {ast.literal_eval(call.args[-1])}")
    return plain


def test_every_whole_number_option_but_a_seed_is_a_count() -> None:
    assert options_typed("int") == ["synthetic_signs.py: --seed"]


def test_a_number_out_of_its_range_is_a_usage_error(capsys) -> None:
    """`--megapixels 0` wrote an empty image, `--megapixels nan` and `--step 0` ended in
    tracebacks, `--seconds -1` timed nothing: refused as the option's values are read."""
    arguments = _arguments()
    parser = arguments.benchmark_parser(DOC)
    parser.add_argument("--seconds", type=arguments.seconds, default=3.0, help="per run")
    parser.add_argument("--megapixels", type=arguments.positive_number, help="image size")
    parser.add_argument("--threshold", type=arguments.fraction, help="lowest score")
    parser.add_argument("--thresholds", type=arguments.cosine_score, nargs="+", help="scores")
    parsed = parser.parse_args(["--seconds", "0", "--megapixels", "0.5", "--threshold", "1"])
    assert (parsed.seconds, parsed.megapixels, parsed.threshold) == (0, 0.5, 1)
    assert parser.parse_args(["--thresholds", "-1", "0.6"]).thresholds == [-1, 0.6]
    for words, said in [
        (["--seconds", "-1"], "expected a number of seconds >= 0, got '-1'"),
        (["--megapixels", "0"], "expected a number above 0, got '0'"),
        (["--megapixels", "nan"], "expected a number above 0, got 'nan'"),
        (["--megapixels", "inf"], "expected a number above 0, got 'inf'"),
        (["--threshold", "1.5"], "expected a number from 0 to 1, got '1.5'"),
        (["--thresholds", "0.5", "two"], "expected a cosine similarity from -1 to 1, got 'two'"),
    ]:
        with pytest.raises(SystemExit):
            parser.parse_args(words)
        assert said in capsys.readouterr().err


def test_every_number_option_is_checked() -> None:
    """No option parses with plain `float`, which lets 0, negatives, NaN and infinity in."""
    assert options_typed("float") == []
