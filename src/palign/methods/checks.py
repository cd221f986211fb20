"""Checks of a method's config values, run when its settings are built, before any work is done.

The ``check_*`` functions check one value; those taking ``(key, value, error)`` serve as a
settings field's :data:`Check` as they are (:func:`palign.methods.base.setting`), and
:func:`integer`, :func:`number` and :func:`choice` make one with bounds or options. Every failed check raises :class:`palign.errors.ConfigError` (or the subclass passed as
``error``) with one line that names the key, the value and what is allowed, e.g.
``method.steps=0: must be an integer >= 1``. Values arrive as Hydra gives them: YAML numbers,
strings from command-line overrides, ``ListConfig`` for lists. Each check returns the value as a
plain Python object (``int``, ``float``, ``bool``, ``list``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

from palign.errors import ConfigError


def show(value: object) -> str:
    """A config value as the message shows it: null, true/false, numbers as written, strings
    quoted, lists in brackets."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def fail(key: str, value: object, allowed: str, error: type[ConfigError] = ConfigError):
    """The error for ``method.<key>=<value>``, which ``must be <allowed>``."""
    return error(f"method.{key}={show(value)}: must be {allowed}")


def is_int(value: object) -> bool:
    """An integer, not a bool (``true`` is no count)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_int(
    key: str,
    value: object,
    minimum: int | None = None,
    maximum: int | None = None,
    error: type[ConfigError] = ConfigError,
) -> int:
    """``value`` as an int within [minimum, maximum] (either bound optional)."""
    if minimum is not None and maximum is not None:
        allowed = f"an integer in {minimum}..{maximum}"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    elif maximum is not None:
        allowed = f"an integer <= {maximum}"
    else:
        allowed = "an integer"
    if (
        not is_int(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise fail(key, value, allowed, error)
    return int(value)


def _number_rule(
    above: float | None, at_least: float | None, below: float | None, at_most: float | None
) -> str:
    low = (f"({above:g}", f"> {above:g}") if above is not None else None
    if at_least is not None:
        low = (f"[{at_least:g}", f">= {at_least:g}")
    high = (f"{below:g})", f"< {below:g}") if below is not None else None
    if at_most is not None:
        high = (f"{at_most:g}]", f"<= {at_most:g}")
    if low and high:
        return f"a number in {low[0]}, {high[0]}"
    if low or high:
        return f"a finite number {(low or high)[1]}"
    return "a finite number"


def check_number(
    key: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    error: type[ConfigError] = ConfigError,
) -> float:
    """``value`` as a finite float within the bounds: ``above``/``below`` exclusive,
    ``at_least``/``at_most`` inclusive (all optional)."""
    if (
        not is_number(value)
        or (above is not None and value <= above)
        or (at_least is not None and value < at_least)
        or (below is not None and value >= below)
        or (at_most is not None and value > at_most)
    ):
        raise fail(key, value, _number_rule(above, at_least, below, at_most), error)
    return float(value)


def check_bool(key: str, value: object, error: type[ConfigError] = ConfigError) -> bool:
    if not isinstance(value, bool):
        raise fail(key, value, "true or false", error)
    return value


def check_choice(
    key: str, value: object, allowed: Sequence[str], error: type[ConfigError] = ConfigError
) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise error(f"method.{key}={show(value)} is not one of {tuple(allowed)}")
    return value


def check_names(key: str, value: object, error: type[ConfigError] = ConfigError) -> list[str]:
    """A non-empty list of non-empty strings (e.g. module names)."""
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise fail(key, value, "a non-empty list of names", error)
    return list(value)


def check_numbers(key: str, value: object, error: type[ConfigError] = ConfigError) -> list[float]:
    """A non-empty list of finite numbers."""
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(is_number(v) for v in value)
    ):
        raise fail(key, value, "a non-empty list of finite numbers", error)
    return [float(v) for v in value]


def path(key: str, value: object, error: type[ConfigError] = ConfigError) -> str:
    """A non-empty path, as a string (whether it exists is checked where it is used)."""
    if not isinstance(value, str) or not value.strip():
        raise fail(key, value, "a folder's path", error)
    return value


def check_seed(key: str, value: object, error: type[ConfigError] = ConfigError) -> int:
    """A random seed: an integer >= 0 (numpy's generators refuse negative seeds)."""
    return check_int(key, value, 0, error=error)


#: A settings field's rule: ``(key, value, error class) -> the value as plain Python``.
Check = Callable[[str, Any, type[ConfigError]], Any]


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    """An int within [minimum, maximum] (:func:`check_int`)."""
    return lambda key, value, error: check_int(key, value, minimum, maximum, error)


def number(**bounds: float) -> Check:
    """A finite float within ``bounds`` (:func:`check_number`'s ``above``, ``at_least``,
    ``below``, ``at_most``)."""
    return lambda key, value, error: check_number(key, value, error=error, **bounds)


def optional(rule: Check) -> Check:
    """null, or a value ``rule`` allows."""
    return lambda key, value, error: None if value is None else rule(key, value, error)


def choice(*allowed: str) -> Check:
    """One of ``allowed`` (:func:`check_choice`)."""
    return lambda key, value, error: check_choice(key, value, allowed, error)
