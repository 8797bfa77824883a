"""Checks of the values callers pass, shared by packages that may not import each other."""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

# YAML 1.1's words for true and false, which YAML 1.2 (the configs' rules) leaves text.
_SWITCH_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def is_number(value: object) -> bool:
    """Whether `value` is a real number, numpy's too: True and "2" are not, though float()
    takes them (a threshold of True would pass as 1.0)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_whole_number(value: object) -> bool:
    """Whether `value` is a whole number, numpy's too (np.arange gives np.int64): True is
    not, nor is 2.0."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def read_switch_word(value: Any) -> Any:
    """`value`, or the bool it means where it is yes/no/on/off (any case): the config loader
    leaves those words text, and a boolean setting reads them as true and false."""
    return _SWITCH_WORDS.get(value.lower(), value) if isinstance(value, str) else value
