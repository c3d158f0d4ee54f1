"""attrs validators for the option records (``PoolOptions``, ``WorkerOptions``, ``BreakerOptions``,
``RetryPolicy``, ``WebsocketOptions``, ``FakeLMConfig``): one home for all of them.

Each raises ``ValueError`` naming the field, the rule and the value (``workers must be >= 1, not 0``).
A value that cannot be compared at all (a string for a number) raises the comparison's ``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def at_least(minimum: float, *, optional: bool = False) -> Validator:
    """``value >= minimum``; with ``optional``, None is allowed too (it means "no limit")."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if value is None or not value >= minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, not {value!r}")

    return check


def positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``value > 0``."""
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


def non_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``value >= 0``."""
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


def finite_non_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``value >= 0`` and finite (no ``inf``, no ``nan``)."""
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


def fraction(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``0 <= value <= 1``."""
    if not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be within [0, 1], not {value!r}")


def http_error_status(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """None, or an HTTP error status (400-599)."""
    if value is not None and not 400 <= value <= 599:
        raise ValueError(f"{attribute.name} must be an HTTP error status (400-599), not {value!r}")
