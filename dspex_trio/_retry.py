"""The dispatch decisions, pure: how long to wait between attempts, whether a failed attempt is sent
again and how, and where an attempt goes.

No trio, no I/O: times are passed in and the random source is injected (a seeded ``random.Random`` gives
exact delays in tests). The loop that acts on these decisions, for the pool and the bridge alike, is
``dspex_trio._dispatch.Dispatch``.

- :class:`RetryPolicy`: how many attempts a call gets and the wait before each retry. The wait before
  retry ``n`` (``n`` = 1 for the first retry) is ``min(cap, initial * multiplier ** (n - 1))``, of which
  a ``jitter`` fraction is random: ``base * (1 - jitter * u)`` with ``u`` uniform in [0, 1).
  ``jitter=0`` waits exactly the base; ``jitter=1`` is "full jitter" (anywhere in [0, base)).
- :class:`Attempts`: one call's attempts and deadline, and :meth:`Attempts.after`, the one rule for what
  follows a failed attempt (a :class:`Step`). Only calls that never started and calls marked idempotent
  are sent again; a worker that lacks the program gets it resent with its spec.
- :func:`place`: which worker takes an attempt.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, TypeVar

import attrs

from dspex_trio._errors import CacheMiss, CallTimeout, ProtocolError, WorkerClosed, WorkerCrashed
from dspex_trio._validators import at_least, fraction

if TYPE_CHECKING:
    from dspex_trio._programs_host import ProgramKey


class RandomSource(Protocol):
    def random(self) -> float:
        """A float uniform in [0, 1)."""


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with jitter and a cap. Every duration is in seconds."""

    initial: float = attrs.field(default=0.01, validator=at_least(0))
    """Base wait before the first retry."""
    multiplier: float = attrs.field(default=2.0, validator=at_least(1))
    """Each further retry waits this many times longer (before the cap)."""
    cap: float = attrs.field(default=1.0, validator=at_least(0))
    """Longest base wait."""
    jitter: float = attrs.field(default=0.5, validator=fraction)
    """Random fraction of each wait (0: none; 1: full jitter)."""
    max_attempts: int = attrs.field(default=4, validator=at_least(1))
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


class Step(enum.Enum):
    """What follows a failed attempt of a call (decided by :meth:`Attempts.after`)."""

    FAIL = "fail"
    """The attempt's error is the call's outcome."""
    RESEND_SPEC = "resend_spec"
    """The worker lacks the program (its cache evicted it, or was reset): send again at once, with the
    program's spec."""
    REDISPATCH = "redispatch"
    """The call never started (its worker died, hung or broke the protocol before acking it): send it
    again after a backoff, to any worker."""
    REDISPATCH_NOW = "redispatch_now"
    """The worker refused it before running it (it began closing, e.g. recycled): send again at once."""
    RETRY_ELSEWHERE = "retry_elsewhere"
    """It started, and is idempotent: send it again, once, after a backoff, to another worker if there
    is one."""


class Attempts:
    """One call's attempts so far, its deadline, and the rule for what follows a failed attempt.

    Pure: times are passed in. ``dspex_trio._dispatch.Dispatch`` (one per call of the pool or the
    bridge) is one. Slotted: the pool makes one per call.
    """

    __slots__ = (
        "avoid",
        "deadline",
        "delivered",
        "idempotent",
        "made",
        "policy",
        "retried",
        "timeout",
        "with_spec",
    )

    def __init__(self, policy: RetryPolicy, *, now: float, timeout: float | None, idempotent: bool) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        self.policy = policy
        self.timeout = timeout
        """The caller's ``timeout=``, in seconds (None: none; the caller's own Trio deadline still applies:
        the worker handle tells the worker the earlier of the two)."""
        self.deadline = math.inf if timeout is None else now + timeout
        """When ``timeout`` runs out (``trio.current_time()`` scale; inf without one)."""
        self.idempotent = idempotent
        self.made = 1
        """Attempts made (the one in progress included)."""
        self.retried = False
        """The idempotent retry was spent."""
        self.with_spec = False
        """Send the program's spec with every attempt from now on (a worker said it lacked it)."""
        self.delivered = False
        """A stream's consumer saw an event: the call is never sent again."""
        self.avoid: str | None = None
        """The worker the idempotent retry avoids (where the call started and failed)."""

    def time_left(self, now: float, method: str) -> float | None:
        """The seconds left for an attempt sent at ``now`` (None: no ``timeout``).

        Raises:
            CallTimeout: none is left (the deadline passed while the call waited for a worker).
        """
        if self.timeout is None:
            return None
        left = self.deadline - now
        if left > 0:
            return left
        raise CallTimeout(f"{method} timed out after {self.timeout} s waiting for a worker")

    def after(self, error: BaseException, *, worker: str | None, closing: bool) -> Step:
        """What follows the latest attempt, which failed with ``error`` on ``worker``; records it.

        In order: a stream whose consumer already saw events is never sent again; a cache miss
        (``CacheMiss``) is resent at once with the program's spec, once; past the policy's
        ``max_attempts`` nothing is sent again; a call that never started (``WorkerCrashed`` /
        ``ProtocolError`` with ``started`` False) is re-dispatched after a backoff; one that started is
        retried once, elsewhere, if idempotent; one refused by a closing worker (``WorkerClosed``) is
        re-dispatched at once unless the backend itself is ``closing``. Anything else (the worker's
        answer, a timeout, ...) is the call's outcome.
        """
        if self.delivered:
            return Step.FAIL
        if isinstance(error, CacheMiss):
            if self.with_spec:
                return Step.FAIL
            self.with_spec = True
            return Step.RESEND_SPEC
        if not self.policy.allows(self.made):
            return Step.FAIL
        if isinstance(error, (WorkerCrashed, ProtocolError)):
            if not error.started:
                step = Step.REDISPATCH
            elif self.idempotent and not self.retried:
                self.retried = True
                self.avoid = worker
                step = Step.RETRY_ELSEWHERE
            else:
                return Step.FAIL
        elif isinstance(error, WorkerClosed) and not closing:
            step = Step.REDISPATCH_NOW
        else:
            return Step.FAIL
        self.made += 1
        return step

    def resume_at(self, now: float, rng: RandomSource) -> float:
        """When the next attempt may go, after a backoff step at ``now``: the policy's wait for this
        retry, never past the deadline."""
        return min(now + self.policy.delay(self.made - 1, rng), self.deadline)


class _Load(Protocol):
    @property
    def worker_id(self) -> str: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def capacity(self) -> int: ...


class Candidate(Protocol):
    """What placement reads of a worker slot (the pool's tenure of a worker)."""

    @property
    def worker(self) -> _Load: ...
    @property
    def retiring(self) -> bool: ...
    @property
    def programs(self) -> set[ProgramKey]: ...


C = TypeVar("C", bound=Candidate)


def place(candidates: Iterable[C], program: ProgramKey | None, avoid: str | None) -> C | None:
    """The candidate an attempt goes to, or None when every worker is full, retiring or not taking calls.

    The least loaded (fewest calls in flight) of those with free capacity; among equals, one that holds
    ``program``, then the first. ``avoid`` (the worker an idempotent call failed on) only when no other
    fits.
    """
    best: C | None = None
    best_load = 0
    spare: C | None = None
    for candidate in candidates:
        worker = candidate.worker
        if candidate.retiring or not worker.accepting or worker.in_flight >= worker.capacity:
            continue
        if avoid is not None and worker.worker_id == avoid:
            spare = candidate
            continue
        load = 2 * worker.in_flight + (0 if program is not None and program in candidate.programs else 1)
        if best is None or load < best_load:
            best, best_load = candidate, load
    return best if best is not None else spare
