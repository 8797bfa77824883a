"""Exceptions whose message is meant for the user as-is (the CLI prints them after
`error: `: one line, or several problems a line each)."""

import contextlib
import difflib
from collections.abc import Iterator


class ShituError(Exception):
    """Base class for errors caused by user input (files, configs, checkpoints)."""


class ConfigError(ShituError):
    """A config file or override is missing, malformed, or names an unknown key."""


class CheckpointError(ShituError):
    """A weight file cannot be read or does not fit the model."""


class MissingWeightFileError(CheckpointError):
    """A weight file that is not there, with the setting that gave its path where the
    loader was told it (`weight_file_setting`)."""

    def __init__(self, path: object, setting: str | None = None) -> None:
        self.path, self.setting = path, setting
        where = f"{setting}: " if setting else ""
        super().__init__(f"{where}weight file not found: {path}")


@contextlib.contextmanager
def weight_file_setting(setting: str) -> Iterator[None]:
    """Name `setting` (`Global.pretrained_model`) in the error about a missing weight file
    loaded inside: the path alone leaves the user to find which setting of a config, or
    which override, gave it. One named inside already (a nested setting) stays as it is."""
    try:
        yield
    except MissingWeightFileError as exc:
        if exc.setting is not None:
            raise
        raise MissingWeightFileError(exc.path, setting) from None


class DataError(ShituError):
    """A dataset's label file or images are missing, malformed or unreadable."""


class GalleryError(ShituError):
    """A gallery library is missing, corrupt, or does not fit the model or request."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """A ' (did you mean ...?)' hint for a misspelt name, or ''."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
