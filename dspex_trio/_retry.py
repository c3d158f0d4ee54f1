"""The retry policy: how many attempts a call gets, and how long to wait between them.

Pure: no trio, no I/O; the random source is injected (a seeded ``random.Random`` gives exact delays in
tests). *Whether* a call may be retried is the pool's rule, not the policy's: only calls that never
started (their worker died before acking them) and calls marked idempotent are retried.

The wait before retry ``n`` (``n`` = 1 for the first retry) is ``min(cap, initial * multiplier **
(n - 1))``, of which a ``jitter`` fraction is random: ``base * (1 - jitter * u)`` with ``u`` uniform in
[0, 1). ``jitter=0`` waits exactly the base; ``jitter=1`` is "full jitter" (anywhere in [0, base)).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, Protocol

import attrs


class RandomSource(Protocol):
    def random(self) -> float:
        """A float uniform in [0, 1)."""


def _at_least(minimum: float) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not value >= minimum:
            raise ValueError(f"{attribute.name} must be >= {minimum}, not {value!r}")

    return check


def _fraction(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be within [0, 1], not {value!r}")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter and a cap. Every duration is in seconds."""

    initial: float = attrs.field(default=0.01, validator=_at_least(0))
    """Base wait before the first retry."""
    multiplier: float = attrs.field(default=2.0, validator=_at_least(1))
    """Each further retry waits this many times longer (before the cap)."""
    cap: float = attrs.field(default=1.0, validator=_at_least(0))
    """Longest base wait."""
    jitter: float = attrs.field(default=0.5, validator=_fraction)
    """Random fraction of each wait (0: none; 1: full jitter)."""
    max_attempts: int = attrs.field(default=4, validator=_at_least(1))
    """Attempts of one call in all, the first included."""

    def base_delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1-based) without jitter."""
        if retry < 1:
            raise ValueError(f"retry numbers start at 1, not {retry}")
        delay = self.initial * self.multiplier ** (retry - 1)
        return min(self.cap, delay)

    def delay(self, retry: int, rng: RandomSource) -> float:
        """The wait before retry number ``retry`` (1-based), jittered with one draw from ``rng``."""
        base = self.base_delay(retry)
        if self.jitter == 0:
            return base
        return base * (1 - self.jitter * rng.random())

    def delays(self, rng: RandomSource | None = None) -> Iterator[float]:
        """The waits before each retry a call may get (``max_attempts - 1`` of them)."""
        source = rng if rng is not None else random.Random()
        for retry in range(1, self.max_attempts):
            yield self.delay(retry, source)

    def allows(self, attempts: int) -> bool:
        """True if a call that made ``attempts`` attempts may make one more."""
        return attempts < self.max_attempts
