"""The config's value checks and its error: shared by every section's module."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from clipcl.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration. The message is one line naming the key and what is allowed."""


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def check_integer(key: str, value: Any, minimum: int, optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is an integer >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}{' (or null)' if optional else ''}, got {value!r}")


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a finite number in the range ``[low, high]`` (``(low, high]``
    with ``low_open``; an end that is None is unbounded), or None when ``optional``."""
    if value is None and optional:
        return
    good = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    good = good and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not good:
        if low is not None and high is not None:
            allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            allowed = f"{'>' if low_open else '>='} {low:g}"
        else:
            allowed = f"<= {high:g}"
        raise ConfigError(f"{key} must be a finite number {allowed}{' (or null)' if optional else ''}, got {value!r}")


def check_betas(key: str, value: Any) -> list[float]:
    """Adam's two moment decays as a list of floats (YAML-ready; ``"9e-1"``, which PyYAML reads as text,
    counts as its number); ConfigError unless two finite numbers in ``[0, 1)``."""
    problem = ConfigError(f"{key} must be two numbers in [0, 1), such as [0.9, 0.98], got {value!r}")
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise problem
    betas = []
    for beta in value:
        if isinstance(beta, str):
            try:
                beta = float(beta)
            except ValueError:
                raise problem from None
        if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta) or not 0.0 <= beta < 1.0:
            raise problem
        betas.append(float(beta))
    return betas
