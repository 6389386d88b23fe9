"""Checks of argument values, and the wording of errors, that every layer shares."""

from __future__ import annotations

import numbers


def is_whole_number(value) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def whole_number(value, name: str, minimum: int = 1, note: str = "") -> int:
    """``value`` as Python's int, refused with a ValueError naming ``name`` unless it is a whole number >=
    ``minimum``. NumPy's integers come back as Python's, which JSON writes; ``note`` follows the bound in the
    message ("(0 skips it)")."""
    if not is_whole_number(value) or value < minimum:
        note = f" {note}" if note else ""
        raise ValueError(f"{name} must be a whole number >= {minimum}{note}; got {value!r}.")
    return int(value)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name where it has none), for messages of one line."""
    return (str(err).splitlines() or [type(err).__name__])[0]


def named_error(err: BaseException) -> str:
    """The error's type and the first line of its message, "RuntimeError: ...", or its type alone without one."""
    return f"{type(err).__name__}: {first_line(err)}" if str(err).strip() else type(err).__name__
