"""Argument checks shared by the built-in factories: a wrong type or range names the argument.

The message names the keyword (``hidden must be >= 1. Found hidden=0``), so the error the
spec reports points at ``model.kwargs.hidden``, not at a torch internal.
"""

from __future__ import annotations

from typing import Any


def check_ints(minimum: int | None = 1, **values: Any) -> None:
    """Each value is an int (not a bool) of at least ``minimum`` (None: any int).

    Raises:
        TypeError: a value is not an integer.
        ValueError: a value is below ``minimum``.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer. Found {name}={value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}. Found {name}={value!r}")


def check_numbers(**values: Any) -> None:
    """Each value is a real number (range checks are the caller's).

    Raises:
        TypeError: a value is not an int or a float.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number. Found {name}={value!r}")
