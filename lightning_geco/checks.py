"""What the collection's constructors accept as a count or a number, and store.

NumPy scalars pass as Python's own do (a value read from an array, a sweep's grid), booleans
do not: ``True`` is an int to Python but never a count or a tolerance a user meant.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

__all__ = ["is_count", "is_number", "is_positive_int", "plain_numbers"]


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


def plain_numbers(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays, at any depth of lists, tuples and dicts, as the
    Python numbers and lists they hold (a YAML or JSON writer stores those as plain data)."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if type(value) in (list, tuple):  # not a namedtuple, whose constructor takes fields, not an iterable
        return type(value)(plain_numbers(v) for v in value)
    if type(value) is dict:
        return {k: plain_numbers(v) for k, v in value.items()}
    return value
