"""Entry point of the `shitu` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO

from shitu import __version__
from shitu.cli import (
    average,
    convert,
    demo,
    detect,
    detect_export,
    detect_train,
    eval_pipeline,
    evaluate,
    export,
    extract,
    index,
    info,
    recognize,
    serve,
    train,
)
from shitu.cli.common import expand_home_in_option_values, separate_overrides
from shitu.errors import ShituError, did_you_mean, raised_message
from shitu.fileio import drop_unwritten_stdout
from shitu.runtime import keep_freed_memory

SUBCOMMANDS = (
    train,
    evaluate,
    convert,
    average,
    info,
    detect,
    export,
    extract,
    index,
    recognize,
    eval_pipeline,
    demo,
    detect_train,
    detect_export,
    serve,
)


# Other tools' names for shitu's commands, told the command meant: by spelling alone,
# `index rename` was told 'remove', which deletes images, and `index create` 'relabel'.
COMMAND_SYNONYMS = {
    "rename": "relabel",
    "create": "build",
    "new": "build",
    "delete": "remove",
    "rm": "remove",
    "info": "stats",
    "show": "stats",
    "query": "search",
    "check": "verify",
    "predict": "recognize",
    "classify": "recognize",
    "embed": "extract",
}


class _SuggestingParser(argparse.ArgumentParser):
    """A value that is not one of an argument's choices is told the choice it may be a
    misspelling of, as misspelt options are (`_parse`): `shitu recognise`, in the spelling
    the docs' prose uses, `--format tabel`; a command of a group given without the group
    (`shitu build`), the whole command; another tool's name for a command
    (`COMMAND_SYNONYMS`: `index rename`), the command. Subcommands' parsers are of this
    class too."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            choices = [str(choice) for choice in action.choices or ()]
            typed = str(value)
            word = COMMAND_SYNONYMS.get(typed, typed)
            hint = (
                (f" (did you mean '{word}'?)" if word != typed and word in choices else "")
                or _grouped_command_hint(word, action)
                or did_you_mean(typed, choices)
            )
            if not hint:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}{hint}") from None

    def error(self, message: str) -> NoReturn:
        """A group of commands given none (`shitu index`): its help, which lists them, then
        the error, as `shitu` alone prints its help (argparse's usage named only CMD)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and message.endswith(
                f"required: {action.metavar}"
            ):
                self.print_help(sys.stderr)
                self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)

    def _print_message(self, message: str, file: TextIO | None = None) -> None:
        """Help and version text as argparse writes it, but a failed write to stdout is
        raised (`main` says so), not dropped: `shitu index build --help > /dev/full`, whose
        text outgrows stdout's buffer, exited 0, having written nothing."""
        if message and file is sys.stdout:
            file.write(message)
        else:
            super()._print_message(message, file)


def _grouped_command_hint(word: str, action: argparse.Action) -> str:
    """' (did you mean 'index build'?)' where `word` is a command of a group of commands
    (`index`) that `action` chooses among; else ''."""
    if not isinstance(action, argparse._SubParsersAction):
        return ""
    for group, parser in action.choices.items():
        for inner in parser._actions:
            if isinstance(inner, argparse._SubParsersAction) and word in inner.choices:
                return f" (did you mean '{group} {word}'?)"
    return ""


def build_parser() -> argparse.ArgumentParser:
    parser = _SuggestingParser(
        prog="shitu",
        description="General image recognition: detect objects, embed them, search a gallery.",
        # Where a new user starts, and how to learn a command: the list alone says neither.
        epilog="New here? `shitu demo` runs the whole system on generated photos, offline. "
        "`shitu COMMAND --help` lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"shitu {__version__}")
    _add_verbose_argument(parser, default=False)
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(subparsers)
    for command in _commands(parser):
        # An unknown option is then reported with the usage of the command it was given to
        # (argparse reports it with `shitu`'s, which lists no option of the command).
        command.set_defaults(command_parser=command)
        command.formatter_class = DefaultsShownFormatter
        # `shitu recognize ... -v` as well as `shitu -v recognize ...`; left out there, the
        # command leaves the value `shitu -v` gave.
        _add_verbose_argument(command, default=argparse.SUPPRESS)
    return parser


def _add_verbose_argument(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v on `shitu` (`default` False) and on each command (SUPPRESS: unset, it keeps
    what `shitu -v` said)."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="log progress details; errors with their cause",
    )


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers of `parser`'s (sub)commands, nested ones too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield command
                yield from _commands(command)


class DefaultsShownFormatter(argparse.HelpFormatter):
    """`-h` names each option's default value, as `(default: VALUE)`, where its help does
    not already say what the default is; options without one (None, an unset flag, an
    empty list) are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if (
            not text
            or "default" in text
            or not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, with unknown options reported by their command's parser,
    with the option they may be a misspelling of."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command: argparse.ArgumentParser = getattr(args, "command_parser", parser)
        options = [name for action in command._actions for name in action.option_strings]
        typo = next((word.split("=")[0] for word in unknown if word.startswith("--")), "")
        command.error(
            f"unrecognized arguments: {' '.join(unknown)}{did_you_mean(typo, options)}"
            f"{_split_override_hint(argv, unknown)}"
        )
    return args


# A config key path as overrides write it (Global.epochs, Loss.Train.0.CELoss.weight): a
# section's capitalised name, then dotted parts; a value's second word seldom looks so.
_CONFIG_KEY = re.compile(r"[A-Z]\w*(\.[\w-]+)+")


def _split_override_hint(argv: list[str], unknown: list[str]) -> str:
    """Advice for an override split into words that argparse then does not know: a key and
    its value as two (`-o Global.epochs 5`), a value with a space left unquoted (`-o
    Global.output_dir=my run`), and overrides after another option (`-o A=1 --time-limit 5
    B=2`), which end `-o`'s list; a key left without its value (`-o A=1 Global.epochs`)
    is not taken for the second word of A's value."""
    for before, word in itertools.pairwise(argv):
        override = before.removeprefix("--override=")
        if word not in unknown:
            continue
        if override != before:
            if "=" not in override:
                return f" (an override is one word, KEY=VALUE: -o {override}={word})"
            if _CONFIG_KEY.fullmatch(word):
                return f" (an override is KEY=VALUE, and {word} has no value: -o {word}=VALUE)"
            return (
                " (a value with spaces is one word, quoted: "
                f"-o {shlex.quote(f'{override} {word}')})"
            )
        if "=" in word and not word.startswith("-"):
            return f" (overrides come after -o, which another option ends: -o {word})"
    return ""


# How a shell reports a process that SIGPIPE ended (128 + 13); Python ignores SIGPIPE, so
# the status is returned instead (signal.SIGPIPE does not exist on Windows).
STDOUT_CLOSED_STATUS = 141


def main(argv: list[str] | None = None) -> int:
    """Run a command; its reader of stdout going away (`shitu ... | head -1`) ends it
    quietly with STDOUT_CLOSED_STATUS, as it ends any other Unix tool. Output that the
    file stdout goes to cannot take (`> out.jsonl` on a full disk) is a one-line error."""
    if sys.stdout is None:  # started with it closed (`>&-`): print() drops text unsaid
        print(
            "error: cannot write to stdout: it is closed; give the output a place to go "
            "(`> FILE`, `> /dev/null`)",
            file=sys.stderr,
        )
        return 2
    _write_file_names_as_they_are()
    given = sys.stdout
    sys.stdout = _naming_itself(given)
    status: int | None = None
    try:
        try:
            status = _run(argv)
            return status
        finally:
            sys.stdout.flush()  # a failed write is seen here, not at interpreter exit
    except BrokenPipeError:
        drop_unwritten_stdout()
        return STDOUT_CLOSED_STATUS
    except OSError as exc:  # raised by the flush: `_run` turns its own into `error:` lines
        drop_unwritten_stdout()
        if status != 2:  # a command that failed has said why (most often this very write)
            print(f"error: cannot write to stdout: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = given


class StdoutWriteError(OSError):
    """A write to stdout that failed other than by its reader going away (the file it goes
    to on a full disk): an OSError of a write names no file, so without this the error
    read as if any file had failed."""


class _StdoutFile(io.FileIO):
    """Stdout's file descriptor, whose failed writes raise StdoutWriteError."""

    def write(self, data: Any) -> int | None:
        try:
            return super().write(data)
        except BrokenPipeError:
            raise  # `main` ends quietly
        except OSError as exc:
            raise StdoutWriteError(exc.errno, exc.strerror) from None


def _naming_itself(stdout: Any) -> Any:
    """The process's stdout (`stdout` where it is that) as a stream that, as it fails to
    write mid-command, raises StdoutWriteError: with its encoding, error handling and
    buffering. Another stream (one a caller or a test put there, or Windows' console,
    which is no file) is returned as it is."""
    if stdout is not sys.__stdout__ or not isinstance(stdout, io.TextIOWrapper):
        return stdout
    unbuffered = not isinstance(stdout.buffer, io.BufferedWriter)  # python -u
    if type(stdout.buffer if unbuffered else stdout.buffer.raw) is not io.FileIO:
        return stdout
    stdout.flush()
    raw = _StdoutFile(stdout.fileno(), "w", closefd=False)
    return io.TextIOWrapper(
        raw if unbuffered else io.BufferedWriter(raw),
        encoding=stdout.encoding,
        errors=stdout.errors,
        line_buffering=stdout.line_buffering,
        write_through=stdout.write_through,
    )


def _write_file_names_as_they_are() -> None:
    """A file name that is not UTF-8 (a Latin-1 name from an old archive) reaches Python
    with its bytes as surrogates, which stdout refuses in a UTF-8 locale (en_US.UTF-8: a
    traceback at the first result naming it): they are written as the bytes they stand
    for, as `ls` writes the name and as Python itself does in the C locale."""
    if isinstance(sys.stdout, io.TextIOWrapper):  # not a StringIO a caller put there
        sys.stdout.reconfigure(errors="surrogateescape")


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    words = expand_home_in_option_values(sys.argv[1:] if argv is None else argv)
    args = _parse(parser, separate_overrides(words))
    handler = _PastProgressHandler()  # stderr
    handler.setFormatter(_LevelPrefixFormatter())
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    # Faiss logs at INFO each faster build it tries and does not have, a ModuleNotFoundError
    # apiece: under -v these read as failures, before the details asked for.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not getattr(args, "func", None):  # no command: a usage error, so not on stdout
        parser.print_help(sys.stderr)
        return 2
    keep_freed_memory()  # torch on the CPU: `shitu eval` 3.3x faster (see shitu.runtime)
    _quiet_opencv()
    previous = _exit_on_sigterm()
    try:
        return args.func(args)
    except BrokenPipeError:
        raise  # stdout's reader went away: `main` ends quietly
    except (ShituError, OSError) as exc:  # OSError: the system refused (disk full, no access)
        if args.verbose:  # with what led to it, e.g. the ValueError behind a config error
            traceback.print_exception(exc)
        print(f"error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:  # unwound: now end as SIGTERM ends a process, for the caller to see
        sys.stdout.flush()  # what a normal exit would still have written
        sys.stderr.flush()
        logging.shutdown()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return 128 + signal.SIGTERM  # not reached
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _PastProgressHandler(logging.StreamHandler):
    """Logs to stderr; a record logged while a progress bar is drawn on the terminal (a
    warning as Ctrl-C stops a training run) goes on a line of its own, not at the end of
    the bar's, which is drawn again below (see `print_past_progress`)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


class _LevelPrefixFormatter(logging.Formatter):
    """`warning: MESSAGE`, as git and pip say it and as the commands print their own
    warnings and errors: a logged warning and a printed one look the same to a user."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def _quiet_opencv() -> None:
    """Images OpenCV cannot decode go on to Pillow, which decodes them or says why:
    OpenCV's own warnings and errors about them (a TIFF of 32-bit samples, a BMP cut
    short: `[ERROR:0@0.6] global loadsave.cpp ... Unexpected end of input stream`, naming
    no file) are noise here; its failures that matter are raised as exceptions. OpenCV
    reads the level from the environment as it loads, so a command that decodes no image
    (`index stats`) need not load it."""
    cv2 = sys.modules.get("cv2")
    if cv2 is None:
        os.environ["OPENCV_LOG_LEVEL"] = "SILENT"
    else:  # loaded already by the program that calls `main`
        opencv_logging = getattr(cv2.utils, "logging", None)  # OpenCV 5; 4.x has none
        if opencv_logging is not None:
            opencv_logging.setLogLevel(opencv_logging.LOG_LEVEL_SILENT)
        else:
            cv2.setLogLevel(0)  # OpenCV 4's LOG_LEVEL_SILENT, which it does not export


def _user_message(exc: ShituError | OSError) -> str:
    """The message of `exc` as raised (see `raised_message`). An OSError names its file
    first."""
    if isinstance(exc, StdoutWriteError):
        return f"cannot write to stdout: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return raised_message(exc)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that it unwinds like Ctrl-C does."""


def _exit_on_sigterm() -> Any:
    """`kill` or a job timeout sends SIGTERM, which by default ends the process on the spot;
    raised as `Terminated` it unwinds instead, so staging folders and temporary files are
    removed, and the process then ends by the signal all the same (callers and service
    managers see a SIGTERM death, not an error status). Returns the handler it replaced
    (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(_signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the unwind
        raise Terminated

    return signal.signal(signal.SIGTERM, terminate)


if __name__ == "__main__":
    sys.exit(main())
