"""Checks of the values callers pass, shared by packages that may not import each other."""

from __future__ import annotations

from numbers import Integral, Real


def is_number(value: object) -> bool:
    """Whether `value` is a real number, numpy's too: True and "2" are not, though float()
    takes them (a threshold of True would pass as 1.0)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def is_whole_number(value: object) -> bool:
    """Whether `value` is a whole number, numpy's too (np.arange gives np.int64): True is
    not, nor is 2.0."""
    return isinstance(value, Integral) and not isinstance(value, bool)
