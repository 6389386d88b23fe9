"""Checks of argument values that every layer shares."""

from __future__ import annotations

import numbers


def is_whole_number(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
