"""What the collection's constructors accept as a count or a number.

NumPy scalars pass as Python's own do (a value read from an array, a sweep's grid), booleans
do not: ``True`` is an int to Python but never a count or a tolerance a user meant.
"""

from __future__ import annotations

import numbers
import operator

__all__ = ["is_count", "is_number", "is_positive_int"]


def is_count(value: object, minimum: int) -> bool:
    """Whether ``value`` is an integer >= ``minimum`` (a Python or NumPy integer; not a bool, not a float)."""
    if isinstance(value, bool):
        return False
    try:
        return operator.index(value) >= minimum  # type: ignore[arg-type]
    except TypeError:
        return False


def is_positive_int(value: object) -> bool:
    """Whether ``value`` is an integer >= 1 (a Python or NumPy integer; not a bool, not a float)."""
    return is_count(value, 1)


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (a Python or NumPy int or float; not a bool, not a string,
    not None). NaN and the infinities count: the caller states the range it takes."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
