"""Exceptions whose message is meant for the user as-is (the CLI prints them after
`error: `: one line, or several problems a line each)."""

import contextlib
import difflib
import shlex
from collections.abc import Iterator, Sequence


class ShituError(Exception):
    """Base class for errors caused by user input (files, configs, checkpoints)."""

    # The config key that gave the file's path, once the message starts with it; `problem`
    # the message after the key (and a flag that set it, `KEY (--FLAG): PROBLEM`), where
    # a caller may name the key another way (with the config file it came from).
    setting: str | None = None
    problem: str | None = None


class ConfigError(ShituError):
    """A config file or override is missing, malformed, or names an unknown key."""


class CheckpointError(ShituError):
    """A weight file cannot be read or does not fit the model."""

    # The message already says how to use the model shipped with shitu instead, so a
    # caller that adds that way out leaves it off (said twice otherwise).
    names_shipped_model: bool = False


@contextlib.contextmanager
def weight_file_setting(setting: str) -> Iterator[None]:
    """Start a CheckpointError raised inside with `setting` (`Global.pretrained_model`),
    the key that named the weight file: the path alone leaves the user to find which
    setting of a config, or which override, gave it. One named inside already (a nested
    setting, `Arch.Backbone.pretrained`) stays as it is."""
    try:
        yield
    except CheckpointError as exc:
        if exc.setting is not None:
            raise
        named = CheckpointError(f"{setting}: {exc}")
        named.setting = setting
        raise named from None


class DataError(ShituError):
    """A dataset's label file or images are missing, malformed or unreadable."""


class GalleryError(ShituError):
    """A gallery library is missing, corrupt, or does not fit the model or request."""


def raised_message(exc: BaseException) -> str:
    """The message `exc` was raised with. Raised in a DataLoader worker (an image that
    cannot be decoded), torch raises it again in the main process with the worker's whole
    traceback as its message: the original message is the traceback's last line."""
    text = str(exc)
    kind = type(exc)
    _, found, message = text.rpartition(f"\n{kind.__module__}.{kind.__qualname__}: ")
    return message.strip() if found and text.startswith("Caught ") else text


def did_you_mean(name: str, choices: list[str]) -> str:
    """A ' (did you mean ...?)' hint for a misspelt name, or ''. Compared without case:
    `celoss` or `pplcnetv2_base` as typed are most like CELoss and PPLCNetV2_base, which
    a comparison with case did not find close enough to name."""
    folded = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), list(folded), n=1)
    return f" (did you mean '{folded[close[0]]}'?)" if close else ""


def first_few(names: Sequence[object], shown: int) -> str:
    """The first `shown` of `names` for a message, and how many more: 'a, b and 3 more'."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def override_word(key: str, value: object) -> str:
    """`KEY=VALUE` for an `-o` in a hint to copy onto a command line: one shell word, quoted
    where the value has spaces or quotes (`output/My Drive/latest.pt`), else as it is."""
    return shlex.quote(f"{key}={value}")
