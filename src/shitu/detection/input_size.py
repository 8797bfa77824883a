"""The input sides a detector takes, checked without loading the network (the command
line checks `--input-size` as it parses it)."""

from shitu.errors import ConfigError


def check_input_size(size: object) -> int:
    """A detector input side: PicoDet's strides go down to 1/32 and its neck joins levels
    that must halve exactly, so any other side fails deep inside the network."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 32:
        raise ConfigError(f"a detector input size is a positive multiple of 32, got {size!r}")
    return size
