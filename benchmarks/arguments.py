"""The command line every benchmark shares, so that `--help` reads the same everywhere.

Benchmarks run as scripts (`python benchmarks/NAME.py`), so they import this as `arguments`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from shitu.errors import ShituError, raised_message
from shitu.fileio import drop_unwritten_stdout


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless there is none (an empty list, as
    a repeatable option's, read "(default: )") or the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return help_text
        if "default" in help_text:
            return help_text
        shown = " ".join(map(str, default)) if isinstance(default, list) else "%(default)s"
        return f"{help_text} (default: {shown})"


def count(text: str) -> int:
    """An argparse type for a number of things (runs, images, threads): 0 or fewer made a
    benchmark divide by zero or take the median of nothing, with a traceback."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def checked_number(what: str, accepts: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type for a finite number that `accepts` (`what` says which): plain
    `float` let a duration, a size or a score of 0, below 0, NaN or infinity through, to a
    traceback or a table of nothing once the work was done."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and accepts(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def existing_file(text: str) -> Path:
    """An argparse type for a file to time: a mistyped one is refused before the work,
    not found after the other rows were timed."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def folder(text: str) -> Path:
    """An argparse type for a folder the benchmark keeps its files in (made where missing):
    a file of that name was refused only when the folder was made, as "File exists"."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, not a folder")
    return path


seconds = checked_number("a number of seconds >= 0", lambda value: value >= 0)
positive_number = checked_number("a number above 0", lambda value: value > 0)
fraction = checked_number("a number from 0 to 1", lambda value: 0 <= value <= 1)
cosine_score = checked_number("a cosine similarity from -1 to 1", lambda value: -1 <= value <= 1)


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the benchmark's docstring `doc`; the
    benchmark then ends on a user's mistake with its message (`_end_without_traceback`)."""
    sys.excepthook = _end_without_traceback
    summary = " ".join(doc.split("\n\n")[0].split())
    return argparse.ArgumentParser(description=summary, formatter_class=_DefaultsFormatter)


def add_batch_timing_arguments(
    parser: argparse.ArgumentParser, threads: str = "CPU threads"
) -> None:
    """--threads and --batches, as the extraction speed benchmarks share them."""
    parser.add_argument("--threads", type=count, default=2, help=threads)
    parser.add_argument("--batches", type=count, nargs="+", default=[1, 32], help="batch sizes")


def _end_without_traceback(
    kind: type[BaseException], error: BaseException, trace: TracebackType | None
) -> None:
    """An uncaught ShituError (`--model` naming no export, an unknown index type) or
    OSError naming its file, as `shitu` reports them: `error: MESSAGE`, not a traceback
    whose last line says the same; stdout's reader gone (`| head -3`) ends it quietly.
    Other exceptions, bugs, keep their traceback. The status stays 1."""
    if isinstance(error, BrokenPipeError):  # the rest of the table has nowhere to go
        drop_unwritten_stdout()
    elif isinstance(error, OSError) and error.strerror and error.filename is not None:
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
    elif isinstance(error, ShituError):
        print(f"error: {raised_message(error)}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, trace)
