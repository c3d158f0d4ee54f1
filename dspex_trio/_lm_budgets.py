"""Pool-wide LM budgets, owned by the host: concurrent requests, requests and tokens per minute, and pauses
after a provider said "too many" (``429`` with ``Retry-After``) or failed (``5xx``).

Workers started with ``--lease-lms`` ask the host before each LM request (a ``lease`` frame, see
docs/protocol.md) and release it after, saying how it went. :class:`LMBudgets` decides when each
request may start; :class:`LeaseDesk` is one worker connection's side of the conversation (the worker
handle delivers lease frames to it and sends its grants). So the budgets hold for the whole pool, not
per worker or thread, and a ``429`` pauses that LM for every worker at once.

The decisions are in :class:`_LMState` (times passed in, no I/O): a request may start when the LM is not
paused, fewer than ``max_concurrent`` of its requests are in flight, and the requests (and tokens)
within the last ``window_s`` seconds, plus ``RATE_MARGIN_S``, leave room for it. For the request rate,
a request counts from its grant while it is in flight, then from when it was sent (the worker says, in
its release): so the provider never sees more than the budget in any window, however late a busy
worker sends what it was granted (a request the provider saw at ``a`` counts until ``a + window``,
and one that may not have reached it yet counts anyway). Waiters queue in
arrival order (a ``trio.Lock`` is fair), so nobody starves. A pause after a failure without a
``Retry-After`` follows one :class:`~dspex_trio._retry.RetryPolicy` (exponential backoff with jitter),
counted over consecutive failures of that LM.

Throttling is published as health events (``lm_throttled`` when a request has to wait, ``lm_paused``
when a failure pauses an LM) and counted in :meth:`LMBudgets.statistics`.
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs
import trio

from bridge_child import wire
from dspex_trio._retry import RandomSource, RetryPolicy
from dspex_trio._validators import at_least, finite_non_negative, positive

logger = logging.getLogger("dspex_trio.lm")

RATE_MARGIN_S: Final = 0.05
"""Seconds added to each rate window: a request started at ``t`` counts against its LM's rates until
``t + window_s + RATE_MARGIN_S``, so the provider, which sees each request a little after the host
granted it (and not always equally late), never counts more than the budget in any window."""
MAX_PAUSE_S: Final = 60.0
"""Longest pause of an LM after one failure, in seconds (a longer ``Retry-After`` is cut to this: the
requests then fail with the provider's error rather than wait longer; see ``bridge_child._lmguard``)."""
MAX_TRACKED_LMS: Final = 1024
"""LMs without a budget whose pauses are tracked, a count (each LM a client configures is one); beyond
it, a ``429`` of a new unbudgeted LM pauses nobody."""
THROTTLE_EVENT_INTERVAL_S: Final = 1.0
"""Seconds between two ``lm_throttled`` health events of one LM (throttling is counted in statistics
for every request; the events only say that it happens, and why)."""
LM_RETRY_POLICY: Final = RetryPolicy(initial=0.5, multiplier=2.0, cap=30.0, jitter=0.5, max_attempts=1_000)
"""The pause after the n-th consecutive failure (``429`` without ``Retry-After``, or ``5xx``) of an LM:
0.5 s, 1 s, 2 s, ... up to 30 s, half of each jittered (``max_attempts`` is unused here: DSPy's own
``num_retries`` counts the attempts of a request)."""


def _optional_positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        positive(instance, attribute, value)


@attrs.frozen(kw_only=True)
class LMBudget:
    """The pool-wide limits of one LM (a model at an API base). None: no limit of that kind.

    Rates hold over every window of ``window_s`` seconds: ``requests_per_minute=600, window_s=1`` is at
    most 10 requests in any one second; the default window, 60 s, is the provider's minute.
    """

    model: str
    """The LM's model, as configured (``openai/gpt-4o-mini``)."""
    api_base: str | None = None
    """The LM's API base (None: the provider's default)."""
    max_concurrent: int | None = attrs.field(default=None, validator=at_least(1, optional=True))
    """Requests in flight at once, a count."""
    requests_per_minute: float | None = attrs.field(default=None, validator=_optional_positive)
    """Requests started per minute."""
    tokens_per_minute: int | None = attrs.field(default=None, validator=at_least(1, optional=True))
    """Tokens used per minute (estimated when a request starts, corrected by what its answer reports)."""
    window_s: float = attrs.field(default=60.0, validator=positive)
    """Seconds over which the rates are held (see the class docstring)."""
    margin_s: float = attrs.field(default=RATE_MARGIN_S, validator=finite_non_negative)
    """Seconds added to each window for the time a request takes to reach the provider, and how much
    that time varies (a provider far away, or a loaded machine, may need more than the default)."""

    @property
    def key(self) -> str:
        """The LM's key (``bridge_child.wire.lm_key``), as workers name it in their leases."""
        return wire.lm_key(self.model, self.api_base)

    def requests_per_window(self) -> int | None:
        """Requests that may start in one window (at least 1), or None without a request rate."""
        if self.requests_per_minute is None:
            return None
        return max(1, math.floor(self.requests_per_minute * self.window_s / 60.0 + 1e-9))

    def tokens_per_window(self) -> int | None:
        """Tokens that may be used in one window (at least 1), or None without a token rate."""
        if self.tokens_per_minute is None:
            return None
        return max(1, math.floor(self.tokens_per_minute * self.window_s / 60.0 + 1e-9))


_SPEC_FIELDS: Final = {
    "concurrent": ("max_concurrent", int),
    "rpm": ("requests_per_minute", float),
    "tpm": ("tokens_per_minute", int),
    "window": ("window_s", float),
    "margin": ("margin_s", float),
}
"""The limits of an LM budget's text form, and the :class:`LMBudget` fields they set."""


def parse_lm_budget(text: str) -> LMBudget:
    """An :class:`LMBudget` from its text form (``--lm-budget``, ``DSPEX_LM_BUDGETS``, the config file):
    ``MODEL[@BASE] [concurrent=N] [rpm=N] [tpm=N] [window=SECONDS] [margin=SECONDS]``, e.g.
    ``"openai/gpt-4o-mini@https://api.openai.com/v1 concurrent=16 rpm=500 tpm=200000"``.

    Raises:
        ValueError: the text is not of that form, or a limit is invalid (the message says which).
    """
    parts = text.split()
    if not parts:
        raise ValueError("an LM budget needs at least the LM: MODEL[@BASE] [concurrent=N] [rpm=N] ...")
    model, _, base = parts[0].partition("@")
    if "/" not in model:
        raise ValueError(f"LM budget {text!r}: the model must be provider/name, not {model!r}")
    if base and not base.startswith(("http://", "https://")):
        raise ValueError(f"LM budget {text!r}: the base after @ must be an http(s) URL, not {base!r}")
    fields: dict[str, Any] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if not eq or name not in _SPEC_FIELDS:
            raise ValueError(
                f"LM budget {text!r}: {part!r} is not one of {', '.join(f'{k}=' for k in _SPEC_FIELDS)}"
            )
        field, kind = _SPEC_FIELDS[name]
        if field in fields:
            raise ValueError(f"LM budget {text!r}: {name} is given twice")
        try:
            fields[field] = kind(value)
        except ValueError:
            raise ValueError(f"LM budget {text!r}: {name} must be a number, not {value!r}") from None
    if not fields.keys() - {"window_s", "margin_s"}:
        raise ValueError(f"LM budget {text!r}: give at least one limit (concurrent=, rpm= or tpm=)")
    try:
        return LMBudget(model=model, api_base=base or None, **fields)
    except ValueError as exc:
        raise ValueError(f"LM budget {text!r}: {exc}") from None


@attrs.frozen
class LMStatistics:
    """A snapshot of one LM's budgets and throttling."""

    lm: str
    """The LM's key (``model @ api_base``)."""
    budgeted: bool
    """It has an operator's budget (else only its pauses are tracked)."""
    in_flight: int
    """Its requests in flight now."""
    max_in_flight: int
    """The most of its requests in flight at once."""
    granted: int
    """Requests granted."""
    throttled: int
    """Requests that had to wait for the budget or a pause."""
    throttled_seconds: float
    """Seconds requests waited, in all."""
    refused: int
    """Leases answered "no" (the pool was closing) or given up by their worker before the answer."""
    rate_limited: int
    """Answers with status ``429``."""
    server_errors: int
    """Answers with a ``5xx`` status."""
    pauses: int
    """Times a failure paused the LM."""
    paused_for: float
    """Seconds the LM stays paused from now (0: not paused)."""
    tokens: int
    """Tokens its answers reported, in all."""


@attrs.define(eq=False)
class _Grant:
    """One granted request: what it counts against until released."""

    state: _LMState | None
    tokens: list[float]
    """``[start time, tokens]``: the entry in the LM's token window (corrected on release)."""


@attrs.define(eq=False)
class _LMState:
    """One LM's budget state. The decisions take the time as an argument (no I/O, no clock)."""

    key: str
    budget: LMBudget | None
    in_flight: int = 0
    sent: list[float] = attrs.Factory(list)
    """A heap of the times its finished requests were sent, while within the rate window (bounded by
    ``requests_per_window``: requests in flight and these never exceed it)."""
    token_entries: collections.deque[list[float]] = attrs.Factory(collections.deque)
    """``[start time, tokens]`` of the requests within the rate window (only with a token rate)."""
    token_sum: float = 0.0
    paused_until: float = -math.inf
    failures: int = 0
    """Consecutive failures (``429``, ``5xx``), for the backoff of the next pause."""
    queue: trio.Lock = attrs.Factory(trio.Lock)
    """Held by the first waiter: the others wait behind it, in arrival order."""
    waiting: int = 0
    """Requests waiting (for the budget, or behind the first waiter): a newcomer queues behind them."""
    changed: trio.Event = attrs.Factory(trio.Event)
    """Set (and replaced) whenever a request ends: a waiter for a free slot looks again."""
    last_event: float = -math.inf
    """When the last ``lm_throttled`` event of this LM was published."""
    max_in_flight: int = 0
    granted: int = 0
    throttled: int = 0
    throttled_seconds: float = 0.0
    refused: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    pauses: int = 0
    tokens_reported: int = 0

    def _span(self) -> float:
        assert self.budget is not None
        return self.budget.window_s + self.budget.margin_s

    def _prune(self, now: float) -> None:
        if self.budget is None:
            return
        horizon = now - self._span()
        while self.sent and self.sent[0] <= horizon:
            heapq.heappop(self.sent)
        while self.token_entries and self.token_entries[0][0] <= horizon:
            self.token_sum -= self.token_entries.popleft()[1]

    def wait_needed(self, now: float, tokens: int) -> tuple[float, str]:
        """How long a request of ``tokens`` must wait before it may start (0: now; ``inf``: until a
        request in flight ends), and what holds it (``paused``, ``concurrency``, ``requests``,
        ``tokens``; "" when nothing does)."""
        self._prune(now)
        wait, why = 0.0, ""
        if now < self.paused_until:
            wait, why = self.paused_until - now, "paused"
        budget = self.budget
        if budget is None:
            return wait, why
        if budget.max_concurrent is not None and self.in_flight >= budget.max_concurrent:
            return math.inf, "concurrency"
        per_window = budget.requests_per_window()
        if per_window is not None and self.in_flight + len(self.sent) >= per_window:
            leaving = self.in_flight + len(self.sent) - per_window + 1  # must leave the window first
            if leaving > len(self.sent):  # those in flight count until they end
                return math.inf, "requests"
            until = heapq.nsmallest(leaving, self.sent)[-1] + self._span() - now
            if until > wait:
                wait, why = until, "requests"
        tokens_per_window = budget.tokens_per_window()
        if tokens_per_window is not None and self.token_entries:
            excess = self.token_sum + tokens - tokens_per_window
            if excess > 0:  # wait until enough of the oldest entries leave the window
                freed, until = 0.0, 0.0
                for started, used in self.token_entries:
                    freed += used
                    until = started + self._span() - now
                    if freed >= excess:
                        break
                if until > wait:
                    wait, why = until, "tokens"
        return max(0.0, wait), why

    def start(self, now: float, tokens: int) -> _Grant:
        """Count a request that starts now."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.granted += 1
        entry = [now, float(tokens)]
        if self.budget is not None and self.budget.tokens_per_minute is not None:
            self.token_entries.append(entry)
            self.token_sum += tokens
        return _Grant(self, entry)

    def finish(
        self,
        grant: _Grant,
        now: float,
        *,
        status: int,
        retry_after: float | None,
        tokens: int,
        sent_ago: float | None,
        rng: RandomSource,
    ) -> float:
        """Count the end of a request (sent ``sent_ago`` seconds ago, None: never sent); returns the
        pause it starts (0: none)."""
        self.in_flight = max(0, self.in_flight - 1)
        budget = self.budget
        if sent_ago is not None and budget is not None and budget.requests_per_minute is not None:
            heapq.heappush(self.sent, now - min(max(0.0, sent_ago), self._span()))
        if tokens > 0:
            self.tokens_reported += tokens
            counted = budget is not None and budget.tokens_per_minute is not None
            if counted and grant.tokens[0] > now - self._span():  # still in the window: correct it
                self.token_sum += tokens - grant.tokens[1]
                grant.tokens[1] = float(tokens)
        pause = 0.0
        if status == 429 or 500 <= status <= 599:
            if status == 429:
                self.rate_limited += 1
            else:
                self.server_errors += 1
            self.failures += 1
            if status == 429 and retry_after is not None and retry_after >= 0:
                pause = retry_after
            else:
                pause = LM_RETRY_POLICY.delay(min(self.failures, 64), rng)
            pause = min(pause, MAX_PAUSE_S)
            if now + pause > self.paused_until:
                self.paused_until = now + pause
                self.pauses += 1
            else:
                pause = 0.0
        elif 200 <= status < 400:
            self.failures = 0
        self.changed.set()
        self.changed = trio.Event()
        return pause

    def statistics(self, now: float) -> LMStatistics:
        return LMStatistics(
            lm=self.key,
            budgeted=self.budget is not None,
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            granted=self.granted,
            throttled=self.throttled,
            throttled_seconds=self.throttled_seconds,
            refused=self.refused,
            rate_limited=self.rate_limited,
            server_errors=self.server_errors,
            pauses=self.pauses,
            paused_for=max(0.0, self.paused_until - now),
            tokens=self.tokens_reported,
        )


class LMBudgets:
    """The budgets of every LM of a pool, and the pauses of those that failed.

    ``publish(kind, data)`` (the pool's event bus) receives ``lm_throttled`` and ``lm_paused`` events.
    """

    def __init__(
        self,
        budgets: Iterable[LMBudget] = (),
        *,
        publish: Callable[[str, dict[str, Any]], object] | None = None,
        rng: RandomSource | None = None,
    ) -> None:
        self._states: dict[str, _LMState] = {}
        for budget in budgets:
            if budget.key in self._states:
                raise ValueError(f"two budgets for the LM {budget.key!r}")
            self._states[budget.key] = _LMState(budget.key, budget)
        self._budgeted = len(self._states)
        self._publish = publish
        self._rng: RandomSource = rng if rng is not None else random.Random()

    @property
    def budgets(self) -> tuple[LMBudget, ...]:
        return tuple(s.budget for s in self._states.values() if s.budget is not None)

    def _state(self, key: str) -> _LMState | None:
        state = self._states.get(key)
        if state is None and len(self._states) - self._budgeted < MAX_TRACKED_LMS:
            state = self._states[key] = _LMState(key, None)
        return state

    def try_acquire(self, key: str, tokens: int = 0) -> _Grant | None:
        """A grant for a request to ``key`` if it may start now and nobody waits before it; else None
        (then :meth:`acquire`). Never blocks."""
        state = self._state(key)
        if state is None:
            return _Grant(None, [0.0, 0.0])
        if state.waiting:
            return None
        now = trio.current_time()
        wait, _ = state.wait_needed(now, tokens)
        if wait > 0:
            return None
        return state.start(now, tokens)

    async def acquire(self, key: str, tokens: int = 0) -> _Grant:
        """Wait (in arrival order) until a request to ``key`` may start, and count it as started.

        Cancelled while waiting, it counts nothing."""
        state = self._state(key)
        if state is None:
            await trio.lowlevel.checkpoint()
            return _Grant(None, [0.0, 0.0])
        await trio.lowlevel.checkpoint()
        waited_from = now = trio.current_time()
        if not state.waiting and state.wait_needed(now, tokens)[0] <= 0:
            return state.start(now, tokens)
        state.throttled += 1
        state.waiting += 1
        try:
            async with state.queue:
                while True:
                    now = trio.current_time()
                    wait, why = state.wait_needed(now, tokens)
                    if wait <= 0:
                        break
                    if now - state.last_event >= THROTTLE_EVENT_INTERVAL_S:
                        state.last_event = now
                        self._event("lm_throttled", {"lm": key, "reason": why, "wait_s": _finite(wait)})
                    changed = state.changed
                    with trio.move_on_after(wait):
                        await changed.wait()
                state.throttled_seconds += now - waited_from
                return state.start(now, tokens)
        finally:
            state.waiting -= 1

    def release(
        self,
        grant: _Grant,
        *,
        status: int = 0,
        retry_after: float | None = None,
        tokens: int = 0,
        sent_ago: float | None = None,
    ) -> None:
        """The granted request ended: with the HTTP ``status`` of its answer (0: none), the answer's
        ``Retry-After`` in seconds, the tokens it reported, and how long ago it was sent (None: never
        sent). A ``429`` or ``5xx`` pauses the LM."""
        state = grant.state
        if state is None:
            return
        pause = state.finish(
            grant,
            trio.current_time(),
            status=status,
            retry_after=retry_after,
            tokens=tokens,
            sent_ago=sent_ago,
            rng=self._rng,
        )
        if pause > 0:
            logger.info("LM %s answered %s: paused for %.2f s (every worker)", state.key, status, pause)
            self._event(
                "lm_paused",
                {"lm": state.key, "status": status, "pause_s": pause, "retry_after": retry_after},
            )

    def refused(self, key: str) -> None:
        state = self._states.get(key)
        if state is not None:
            state.refused += 1

    def statistics(self) -> tuple[LMStatistics, ...]:
        """Each budgeted LM, and each other LM that has been used (in order of first use)."""
        now = trio.current_time()
        return tuple(s.statistics(now) for s in self._states.values() if s.budget is not None or s.granted)

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if self._publish is not None:
            self._publish(kind, data)


def _finite(seconds: float) -> float | None:
    return None if math.isinf(seconds) else round(seconds, 3)


class LeaseDesk:
    """One worker connection's leases: answers the worker's ``lease`` frames from the pool's
    :class:`LMBudgets` and counts its ``release`` frames back.

    The worker handle calls :meth:`request` and :meth:`release` as frames arrive (never blocking) and
    runs :meth:`serve` in its nursery; ``answer`` sends a ``grant`` frame (the handle checks the lease
    still waits for one). When the worker is gone, :meth:`serve` returns every lease it held.
    """

    def __init__(self, budgets: LMBudgets, answer: Callable[[wire.LeaseGrant], None]) -> None:
        self._budgets = budgets
        self._answer = answer
        self._waiting: dict[int, trio.CancelScope] = {}
        self._granted: dict[int, _Grant] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def granted(self) -> int:
        return len(self._granted)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the waits of this connection's leases until cancelled; then give back what it held."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closed = True
            self._nursery = None
            for grant in self._granted.values():
                self._budgets.release(grant)
            self._granted.clear()

    def request(self, message: wire.LeaseRequest) -> None:
        """A ``lease`` frame: grant it now if the budget allows, else wait for it in a task."""
        if self._closed or self._nursery is None:
            self._budgets.refused(message.lm)
            self._answer(wire.LeaseGrant(message.lease, ok=False, reason="the pool is closing"))
            return
        grant = self._budgets.try_acquire(message.lm, max(0, message.tokens))
        if grant is not None:
            self._granted[message.lease] = grant
            self._answer(wire.LeaseGrant(message.lease))
            return
        scope = trio.CancelScope()
        self._waiting[message.lease] = scope
        self._nursery.start_soon(self._wait, message, scope)

    async def _wait(self, message: wire.LeaseRequest, scope: trio.CancelScope) -> None:
        grant = None
        try:
            with scope:
                grant = await self._budgets.acquire(message.lm, max(0, message.tokens))
        finally:
            self._waiting.pop(message.lease, None)
        if grant is None:  # the worker stopped waiting (its release came first)
            self._budgets.refused(message.lm)
            self._answer(wire.LeaseGrant(message.lease, ok=False, reason="released before its grant"))
            return
        self._granted[message.lease] = grant
        self._answer(wire.LeaseGrant(message.lease))

    def release(self, message: wire.LeaseRelease) -> None:
        """A ``release`` frame: the request ended (counted back), or the worker stopped waiting."""
        scope = self._waiting.get(message.lease)
        if scope is not None:
            scope.cancel()
            return
        grant = self._granted.pop(message.lease, None)
        if grant is not None:
            self._budgets.release(
                grant,
                status=message.status,
                retry_after=message.retry_after,
                tokens=max(0, message.tokens),
                sent_ago=message.sent_ago,
            )
