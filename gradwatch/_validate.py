"""Argument checks shared by every public constructor: numbers that must be positive, and not bools.

``True`` is an ``int`` in Python, so ``isinstance(x, int)`` alone lets ``every=True`` through; these
checks refuse bools everywhere, with a message that names the argument and the value.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_positive_int", "positive_int", "positive_number"]


def is_positive_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (not a bool) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int(name: str, value: Any, owner: str | None = None) -> int:
    """Returns ``value`` if it is an integer >= 1 (not a bool).

    Args:
        name: the argument's name, for the message.
        value: what was passed.
        owner: the class or function the argument belongs to, prefixed to the message.

    Raises:
        ValueError: ``"[owner: ]name must be an integer >= 1, got value"``.
    """
    if not is_positive_int(value):
        prefix = f"{owner}: " if owner else ""
        raise ValueError(f"{prefix}{name} must be an integer >= 1, got {value!r}")
    return value


def positive_number(name: str, value: Any, owner: str | None = None, *, upper: float | None = None) -> float:
    """Returns ``value`` as a float if it is a finite number > 0 (and <= ``upper``), not a bool.

    Args:
        name: the argument's name, for the message.
        value: what was passed.
        owner: the class or function the argument belongs to, prefixed to the message.
        upper: an inclusive upper bound, or None.

    Raises:
        TypeError: ``"[owner: ]name must be a number, got <type> value"``.
        ValueError: ``"[owner: ]name must be a positive finite number[ and <= upper], got value"``.
    """
    prefix = f"{owner}: " if owner else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{prefix}{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ValueError(f"{prefix}{name} must be a positive finite number{bound}, got {value!r}")
    return float(value)
