"""Argument validators shared by every public entry point.

Each check takes the argument's name as the caller should report it (``"fit: chains"``)
and raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, invalid
value) whose message names the argument, what was given and what would be valid.
Booleans are never accepted where numbers are expected (``chains=True`` is an error).
A value of the wrong kind raises :class:`ArgumentTypeError`, which is both a
``TypeError`` and a ``ValueError`` (as NumPy's ``AxisError`` is both), so callers that
catch either see it.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (a bool or a string where an int is expected)."""


def check_int(name: str, value, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``.

    Raises
    ------
    ArgumentTypeError
        ``value`` is a bool, a float, a string or anything but an integer.
    ValueError
        ``value`` is below ``minimum`` or above ``maximum``.

    >>> check_int("draws", 10)
    10
    >>> check_int("draws", 0)
    Traceback (most recent call last):
    ValueError: draws must be a positive int, got 0
    """
    kind = "a positive int" if minimum == 1 else ("an int" + ("" if minimum is None else f" >= {minimum}"))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ArgumentTypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r:.40}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}, got {value!r}")
    return value


def check_seed(name: str, value) -> int:
    """A seed: an int in ``[0, 2**63)``."""
    return check_int(name, value, minimum=0, maximum=2**63 - 1)


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None,
                open_minimum: bool = False, open_maximum: bool = False) -> float:
    """``value`` as a finite ``float`` within the given (closed unless ``open_*``) bounds.

    >>> check_float("target_accept", 0.8, 0.0, 1.0, open_minimum=True, open_maximum=True)
    0.8
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    lo_bad = minimum is not None and (value <= minimum if open_minimum else value < minimum)
    hi_bad = maximum is not None and (value >= maximum if open_maximum else value > maximum)
    if lo_bad or hi_bad:
        lo = "" if minimum is None else ("(" if open_minimum else "[") + f"{minimum:g}"
        hi = "" if maximum is None else f"{maximum:g}" + (")" if open_maximum else "]")
        where = f"in {lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{name} must be {where}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` as a ``bool`` (only ``True``/``False``, NumPy bools included)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
    return bool(value)


def check_choice(name: str, value, choices) -> object:
    """``value`` if it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name}: unknown value {value!r}; choose from {list(choices)}")
    return value


def check_names(name: str, values, allowed) -> list:
    """A list of site names, each one of ``allowed`` (a string is one name, not letters)."""
    if isinstance(values, str):
        values = [values]
    values = list(values)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ArgumentTypeError(f"{name} must be site names (str), got {bad!r:.80}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{name}: unknown site(s) {unknown}; valid: {list(allowed)}")
    return values
