"""The one dispatch loop: a call's attempts on a backend's workers, from placement to its one outcome.

The pool and the bridge run every call, execution and stream through a :class:`Dispatch`. The stream is
the primitive: a streamed execution yields the events its worker built (``{"event": "chunk", "field",
"chunk"}``, passed on untouched), then one ``{"event": "completed", "outputs", "usage", "backend"}``;
a call (and ``execute``) is a dispatch without events, whose ``result()`` is its outcome. Both run the
same attempts:

1. placement: the backend's ``_checkout`` (the pool: the least-loaded ready worker, queueing when none is
   free; the bridge: its worker, replaced when it died), away from the worker of a failed idempotent
   attempt when there is another;
2. sending: the program by reference, with its spec when the worker lacks it; the seconds left before
   the caller's ``timeout`` (``CallTimeout`` when none is left). The worker handle tells the worker the
   earlier of that and the caller's own Trio deadline;
3. after a failed attempt, :meth:`~dspex_trio._retry.Attempts.after` decides: the error is the outcome,
   or the call is resent with the spec (cache miss), re-dispatched (it never started), or retried once
   elsewhere (idempotent), after the policy's backoff (never past the deadline). A stream is sent again
   only until its consumer saw an event.

Exactly one outcome per call: the backend's statistics count each call once, ``completed`` or
``failed``. Cancelling the caller (or leaving a stream's block early) cancels the attempt in its worker.

A stream's events pass through two async iterators: this one (which may swap the worker call beneath
it: a cache-miss resend, a re-dispatch) and the worker handle's ``CallStream`` (one call's events, in
``seq`` order, then its terminal frame). ``stream()`` returns the dispatch itself as its context manager:
no generator wraps or re-builds an event on the way (the fallback passes the same iterator on).
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

import trio

from bridge_child import wire
from dspex_trio import _tracing
from dspex_trio._call_metrics import outcome_of
from dspex_trio._errors import CallTimeout, DspexError
from dspex_trio._programs_host import LMUsage, ProgramKey, completed_event
from dspex_trio._retry import Attempts, RandomSource, RetryPolicy, Step
from dspex_trio._sessions import ProgramSpec
from dspex_trio._worker import CallStream, Worker, _Call


class Lease(Protocol):
    """The worker an attempt was placed on, and the programs it holds (as far as the backend knows)."""

    @property
    def worker(self) -> Worker: ...
    @property
    def programs(self) -> set[ProgramKey]: ...


class Host(Protocol):
    """What a dispatch needs of its backend (the pool or the bridge)."""

    name: str
    retry: RetryPolicy
    _rng: RandomSource
    _counts: collections.Counter[str]
    """``calls``, ``completed``, ``failed``, ``redispatched``, ``retried``, ``backoffs``."""
    _backoff_seconds: float
    _closing: bool
    lm_usage: LMUsage
    """Counts what completed executions' ``usage`` said (cache hits, fallbacks)."""

    async def _checkout(self, dispatch: Dispatch) -> Lease:
        """A worker for the next attempt (the backend's admission errors are the call's outcome)."""
        ...

    def _end_attempt(self, lease: Any) -> None:
        """The attempt placed on ``lease`` (by ``_checkout``) ended, whatever its outcome."""
        ...

    def _record_latency(self, method: str, seconds: float) -> None: ...

    def _record_outcome(self, method: str, outcome: str, seconds: float) -> None:
        """A call ended (``ok``, ``cancelled`` or an error's type name; see ``_call_metrics.py``)."""
        ...


class Dispatch(Attempts):
    """One call through a backend's workers (see the module doc). Made by the pool and the bridge.

    A call: ``await dispatch.result()``. A stream: ``async with dispatch: async for event in dispatch``.
    """

    __slots__ = (
        "_attempt",
        "_finished",
        "_span",
        "flags",
        "host",
        "key",
        "method",
        "params",
        "program",
        "started_at",
        "trace",
        "wait",
    )

    def __init__(
        self,
        host: Host,
        method: str,
        params: Any,
        *,
        program: ProgramSpec | None,
        timeout: float | None,
        idempotent: bool = False,
        wait: bool = False,
        stream: bool = False,
    ) -> None:
        now = trio.current_time()
        super().__init__(host.retry, now=now, timeout=timeout, idempotent=idempotent)
        self.host = host
        self.method = method
        self.params = params
        self.program = program
        self.key: ProgramKey | None = None if program is None else (program.id, program.version)
        """The program's version, as workers cache it."""
        self.flags = (wire.FLAG_IDEMPOTENT if idempotent else 0) | (wire.FLAG_STREAM if stream else 0)
        self.wait = wait
        """Admission: wait for a place in a full queue (up to the deadline) instead of ``Overloaded``."""
        self.started_at = now
        self._attempt: tuple[Lease, _Call, CallStream] | None = None
        """A stream's attempt in progress."""
        self._finished = False
        """A stream's outcome was counted."""
        self.trace = ""
        """The ``traceparent`` its attempts carry to the worker (tracing on), else empty."""
        self._span: Any = None
        """A stream's ``dspex.pool`` span (tracing on), until its outcome."""
        host._counts["calls"] += 1

    # -- one attempt ----------------------------------------------------------------------------------
    def _send(self, lease: Lease) -> _Call:
        """Send this attempt to ``lease``'s worker: the program by reference, with its spec if the worker
        lacks it; the seconds left (``CallTimeout`` if none)."""
        params = self.params
        if self.program is not None:
            with_spec = self.with_spec or self.key not in lease.programs
            params = {**params, "program": self.program.wire_ref(with_spec=with_spec)}
        left = None if self.timeout is None else self.time_left(trio.current_time(), self.method)
        return lease.worker._submit(self.method, params, timeout=left, flags=self.flags, trace=self.trace)

    async def _again(self, error: DspexError, lease: Lease) -> bool:
        """After an attempt on ``lease`` failed with ``error`` (and ended): False if the error is the
        call's outcome; else count the next attempt, wait its backoff if it has one, and return True."""
        host = self.host
        step = self.after(error, worker=lease.worker.worker_id, closing=host._closing)
        if step is Step.FAIL:
            error.attempts = self.made
            return False
        if step is Step.RESEND_SPEC:
            return True
        host._counts["retried" if step is Step.RETRY_ELSEWHERE else "redispatched"] += 1
        if step is not Step.REDISPATCH_NOW:
            now = trio.current_time()
            wake = self.resume_at(now, host._rng)
            host._counts["backoffs"] += 1
            host._backoff_seconds += max(0.0, wake - now)
            await trio.sleep_until(wake)
        return True

    def _completed(self, lease: Lease) -> None:
        if self.key is not None:
            lease.programs.add(self.key)
        host = self.host
        host._counts["completed"] += 1
        elapsed = trio.current_time() - self.started_at
        host._record_latency(self.method, elapsed)
        host._record_outcome(self.method, "ok", elapsed)

    # -- a call ---------------------------------------------------------------------------------------
    async def result(self) -> Any:
        """Run the call to its outcome: its value, or its error (see the module doc).

        Cancelling the caller cancels the call in its worker (plain ``trio.Cancelled``).
        """
        if _tracing.STATE.tracer is None:
            return await self._result()
        with _tracing.span(f"dspex.pool {self.method}", {"dspex.method": self.method}):
            self.trace = _tracing.current_traceparent()
            return await self._result()

    async def _result(self) -> Any:
        host = self.host
        try:
            while True:
                lease = await host._checkout(self)
                try:
                    value = await lease.worker._wait(self._send(lease))
                except DspexError as exc:
                    host._end_attempt(lease)
                    if await self._again(exc, lease):
                        continue
                    raise
                except BaseException:
                    host._end_attempt(lease)
                    raise
                host._end_attempt(lease)
                self._completed(lease)
                return value
        except BaseException as exc:
            host._counts["failed"] += 1
            host._record_outcome(self.method, outcome_of(exc), trio.current_time() - self.started_at)
            raise

    # -- a stream -------------------------------------------------------------------------------------
    async def __aenter__(self) -> Dispatch:
        """Send the first attempt (the backend's admission errors raise here). A checkpoint first, also
        when a worker is free at once: a cancelled caller sends nothing. (Once per stream, not per event;
        a call's ``result()`` needs none of its own: it always waits for its reply.) A stream cancelled
        there is counted as a call with its outcome (``cancelled``), as every call is."""
        try:
            await trio.lowlevel.checkpoint()
        except BaseException as exc:  # the caller's deadline passed before anything was sent
            self._finish(failed=True, outcome=outcome_of(exc))
            raise
        if _tracing.STATE.tracer is not None:  # a span of its own, ended with its outcome (``_finish``)
            self._span = _tracing.start_span(f"dspex.pool {self.method}", {"dspex.method": self.method})
            self.trace = _tracing.traceparent_of(self._span)
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Give up on the stream: its attempt in progress is cancelled in its worker; a stream without
        an outcome yet counts as failed. Synchronous, idempotent."""
        if self._attempt is not None:
            lease, call, _ = self._attempt
            self._attempt = None
            lease.worker._abandon(call)
            self.host._end_attempt(lease)
        self._finish(failed=True, outcome="cancelled")

    def _finish(self, *, failed: bool, outcome: str = "error") -> None:
        if not self._finished:
            self._finished = True
            if self._span is not None:
                _tracing.end_span(self._span, outcome if failed and outcome != "cancelled" else None)
                self._span = None
            if failed:
                self.host._counts["failed"] += 1
                self.host._record_outcome(self.method, outcome, trio.current_time() - self.started_at)

    async def _start(self) -> None:
        """Place and send the stream's next attempt."""
        host = self.host
        try:
            while True:
                lease = await host._checkout(self)
                try:
                    call = self._send(lease)
                except DspexError as exc:
                    host._end_attempt(lease)
                    if await self._again(exc, lease):
                        continue
                    raise
                self._attempt = lease, call, CallStream(lease.worker, call)
                return
        except BaseException as exc:
            self._finish(failed=True, outcome=outcome_of(exc))
            raise

    def __aiter__(self) -> Dispatch:
        return self

    async def __anext__(self) -> dict[str, Any]:
        """The next event: the worker's own events as they come, then one ``completed`` event.

        Raises the call's error when it fails (``CallTimeout`` once ``timeout`` passed).
        """
        while not self._finished:
            if self._attempt is None:
                await self._start()
                continue
            lease, _, events = self._attempt
            with trio.move_on_at(self.deadline):
                try:
                    event: dict[str, Any] = await events.__anext__()
                except StopAsyncIteration:
                    pass
                else:
                    self.delivered = True
                    return event
                try:
                    value = await events.result()
                except DspexError as exc:
                    self._attempt = None
                    self.host._end_attempt(lease)
                    if await self._again(exc, lease):
                        continue
                    self._finish(failed=True, outcome=outcome_of(exc))
                    raise
                self._attempt = None
                self.host._end_attempt(lease)
                self._finish(failed=False)
                self._completed(lease)
                self.host.lm_usage.note(value.get("usage"))
                return completed_event(value["outputs"], value.get("usage"), self.host.name)
            self._finish(failed=True, outcome=CallTimeout.__name__)
            self.close()  # the deadline passed while waiting for the worker
            raise CallTimeout(f"{self.method} timed out after {self.timeout} s")
        raise StopAsyncIteration
