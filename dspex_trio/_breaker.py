"""The circuit breaker that guards a pool: closed / open / half-open, its transitions in one table.

Pure and clock-injected: no trio, no I/O. The owner feeds it what it counts as failures (the pool: a
young worker failing, i.e. its restart budget) and asks it whether a probe may start:

- ``closed``: failures are counted in a sliding window of ``window`` seconds; reaching
  ``failure_threshold`` of them trips it ``open``.
- ``open``: callers are refused; after the reset timeout (``reset_timeout``, doubled after each failed
  probe up to ``reset_timeout_max``) the next ``try_probe()`` turns it ``half-open``.
- ``half-open``: probes run one at a time; ``half_open_probes`` successful ones close it (and reset the
  timeout and the window); a failed probe (or any failure) opens it again with a doubled timeout.

Every change goes through ``CircuitBreaker._move(input)``, which consults ``TRANSITIONS`` (with the
runtime's one table lookup, ``dspex_trio._states.next_state``) and reports it to
``on_change(old, new, reason)``.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable
from typing import Final

import attrs

from dspex_trio._states import next_state
from dspex_trio._validators import at_least


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    """Calls pass; failures are counted."""
    OPEN = "open"
    """Calls are refused (``PoolUnavailable``) until the reset timeout passed."""
    HALF_OPEN = "half-open"
    """Probes run; calls are still refused until enough probes succeeded."""


class BreakerInput(enum.StrEnum):
    TRIP = "failure threshold reached"
    RESET_TIMEOUT = "reset timeout elapsed"
    PROBES_PASSED = "probes passed"
    PROBE_FAILED = "probe failed"


TRANSITIONS: Final[dict[tuple[CircuitState, BreakerInput], CircuitState]] = {
    (CircuitState.CLOSED, BreakerInput.TRIP): CircuitState.OPEN,
    (CircuitState.OPEN, BreakerInput.RESET_TIMEOUT): CircuitState.HALF_OPEN,
    (CircuitState.HALF_OPEN, BreakerInput.PROBES_PASSED): CircuitState.CLOSED,
    (CircuitState.HALF_OPEN, BreakerInput.PROBE_FAILED): CircuitState.OPEN,
}
"""(state, input) -> next state. Anything else is a bug: ``InvalidBreakerTransition``."""


class InvalidBreakerTransition(AssertionError):
    """An input not allowed in the breaker's current state: a bug in the breaker or its owner."""


ChangeCallback = Callable[[CircuitState, CircuitState, str], None]


@attrs.frozen
class BreakerStatistics:
    """A snapshot of a breaker."""

    state: CircuitState
    reason: str
    """Why it is open or half-open ("" when closed)."""
    failures: int
    """Failures in the current window (closed)."""
    opened: int
    """Times it opened (trips and failed probes)."""
    retry_at: float
    """Clock time when the next probe may start (``inf`` when closed or a probe runs)."""
    reset_timeout: float
    """The current reset timeout, in seconds (doubles per failed probe)."""


@attrs.define(eq=False, kw_only=True)
class CircuitBreaker:
    """Closed / open / half-open; see the module doc. Every duration is in seconds of ``clock``."""

    clock: Callable[[], float]
    """Monotonic seconds (``trio.current_time`` in the pool; anything in tests)."""
    failure_threshold: int = attrs.field(default=6, validator=at_least(1))
    """Failures within ``window`` that trip it open."""
    window: float = attrs.field(default=10.0, validator=at_least(0))
    """Sliding window for counting failures, in seconds."""
    reset_timeout: float = attrs.field(default=0.5, validator=at_least(0))
    """Open -> half-open after this long; doubles after each failed probe."""
    reset_timeout_max: float = attrs.field(default=30.0, validator=at_least(0))
    half_open_probes: int = attrs.field(default=1, validator=at_least(1))
    """Successful probes needed to close it again."""
    on_change: ChangeCallback | None = None
    trip_label: str = "failure threshold reached"
    """Start of the reason given when it trips (the pool says "restart budget spent")."""
    _state: CircuitState = attrs.field(init=False, default=CircuitState.CLOSED)
    _reason: str = attrs.field(init=False, default="")
    _failures: collections.deque[float] = attrs.field(init=False, factory=collections.deque)
    _timeout: float = attrs.field(init=False, default=0.0)
    _retry_at: float = attrs.field(init=False, default=math.inf)
    _probing: int = attrs.field(init=False, default=0)
    _passed: int = attrs.field(init=False, default=0)
    _opened: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._timeout = self.reset_timeout

    # -- inspection -----------------------------------------------------------------------------------
    @property
    def state(self) -> CircuitState:
        return self._state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def allows_calls(self) -> bool:
        return self._state is CircuitState.CLOSED

    @property
    def retry_at(self) -> float:
        """When ``try_probe()`` may next succeed: the reset deadline while open; now while half-open
        with no probe running; ``inf`` while closed or a probe runs."""
        if self._state is CircuitState.OPEN:
            return self._retry_at
        if self._state is CircuitState.HALF_OPEN and self._probing == 0:
            return self.clock()
        return math.inf

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(
            state=self._state,
            reason=self._reason,
            failures=len(self._failures),
            opened=self._opened,
            retry_at=self.retry_at,
            reset_timeout=self._timeout,
        )

    # -- inputs ---------------------------------------------------------------------------------------
    def record_failure(self, reason: str) -> None:
        """A counted failure (not a probe's own). Closed: may trip it; half-open: reopens it; open:
        nothing more to do."""
        now = self.clock()
        if self._state is CircuitState.CLOSED:
            self._failures.append(now)
            while self._failures and self._failures[0] < now - self.window:
                self._failures.popleft()
            if len(self._failures) >= self.failure_threshold:
                self._open(
                    BreakerInput.TRIP,
                    f"{self.trip_label}: {len(self._failures)} failures within {self.window} s; last: {reason}",
                )
        elif self._state is CircuitState.HALF_OPEN:
            self._fail_probe(f"failure while half-open: {reason}")

    def try_probe(self) -> bool:
        """May a probe start now? If so it is counted as running until ``probe_succeeded`` or
        ``probe_failed``. Open past the reset timeout: turns half-open first."""
        if self._state is CircuitState.OPEN:
            if self.clock() < self._retry_at:
                return False
            self._move(BreakerInput.RESET_TIMEOUT, self._reason)
            self._passed = 0
        if self._state is CircuitState.HALF_OPEN and self._probing == 0:
            self._probing += 1
            return True
        return False

    def probe_succeeded(self) -> None:
        self._end_probe()
        if self._state is not CircuitState.HALF_OPEN:
            return
        self._passed += 1
        if self._passed >= self.half_open_probes:
            self._close()

    def probes_exhausted(self) -> None:
        """The owner cannot start more probes now (the pool: no empty slot left). Half-open with at
        least one probe passed and none running: that is all the evidence there will be, so close."""
        if self._state is CircuitState.HALF_OPEN and self._probing == 0 and self._passed >= 1:
            self._close()

    def probe_failed(self, reason: str) -> None:
        self._end_probe()
        if self._state is CircuitState.HALF_OPEN:
            self._fail_probe(f"probe failed: {reason}")

    # -- internals ------------------------------------------------------------------------------------
    def _end_probe(self) -> None:
        if self._probing <= 0:
            raise InvalidBreakerTransition("a probe ended that was never started")
        self._probing -= 1

    def _fail_probe(self, reason: str) -> None:
        self._timeout = min(self._timeout * 2, self.reset_timeout_max)
        self._open(BreakerInput.PROBE_FAILED, reason)

    def _close(self) -> None:
        self._failures.clear()
        self._timeout = self.reset_timeout
        self._retry_at = math.inf
        self._move(BreakerInput.PROBES_PASSED, "")

    def _open(self, event: BreakerInput, reason: str) -> None:
        self._opened += 1
        self._retry_at = self.clock() + self._timeout
        self._move(event, reason)

    def _move(self, event: BreakerInput, reason: str) -> None:
        old = self._state
        self._state = next_state(TRANSITIONS, old, event, InvalidBreakerTransition)
        self._reason = reason
        if self.on_change is not None:
            self.on_change(old, self._state, reason)
