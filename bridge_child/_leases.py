"""The worker's side of LM leases: before each LM request, ask the host and wait for its grant; after it,
release the lease with the answer's status, ``Retry-After`` and token count (docs/protocol.md, "LM
leases"; the host's side is ``dspex_trio._lm_budgets``).

A worker leases when the host started it with ``--lease-lms`` (the pool has LM budgets). The thread
that sends the request waits on an event that the reader sets when the grant arrives, or when a
``cancel`` for its call arrives: a cancelled call never sleeps through its cancel, and a wait never
outlasts the call's deadline. Waiting threads cost the host nothing: the host queues the leases, and
the worker's threads only block.

No dspy here: ``bridge_child._lmguard`` wires this into lm15's transports.
"""

from __future__ import annotations

import email.utils
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from bridge_child import wire

if TYPE_CHECKING:
    from bridge_child._context import CallContext

BYTES_PER_TOKEN_ESTIMATE: Final = 4
"""Request body bytes counted as one token when a lease asks for a tokens-per-minute budget (the
answer's own count replaces the estimate when the lease is released)."""
USAGE_TAIL_BYTES: Final = 64 * 1024
"""Bytes kept from the end of an answer to read its token count (``usage.total_tokens``) from."""
MAX_RETRY_AFTER_S: Final = 3600.0
"""Largest ``Retry-After`` passed on to the host, in seconds (the host caps its pauses lower)."""


class LeaseRefused(Exception):
    """The host did not grant a lease (the pool is closing): the LM request is not sent."""


class LeaseAbandoned(Exception):
    """The call stopped waiting for its lease: cancelled, or its deadline came first."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        """``cancelled`` or ``deadline``."""


class _Waiter:
    __slots__ = ("call", "event", "ok", "reason", "wake")

    def __init__(self, call: int) -> None:
        self.call = call
        self.event = threading.Event()
        self.ok: bool | None = None
        self.reason = ""
        self.wake: Callable[[], None] | None = None
        """Wakes an asynchronous waiter (on its event loop), besides ``event``."""


class Leases:
    """The leases of one worker: :meth:`acquire` (any thread), :meth:`on_grant` and :meth:`on_cancel`
    (the reader), :meth:`release` (any thread). ``send(message)`` writes a frame at once (under the
    worker's send lock, which also guards the lease table of its ``wire.Connection``)."""

    def __init__(self, send: Callable[[wire.ChildMessage], None]) -> None:
        self._send = send
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        self.counters = {"leases": 0, "refused": 0, "abandoned": 0, "waited_ms": 0}

    def acquire(self, ctx: CallContext | None, lm: str, tokens: int = 0) -> Lease:
        """Ask for a lease for one request to ``lm`` and wait for it.

        Raises:
            LeaseAbandoned: the call was cancelled, or its deadline passed, first (the lease is released).
            LeaseRefused: the host said no.
        """
        call = ctx.id if ctx is not None else 0
        if ctx is not None and ctx.cancelled.is_set():
            raise LeaseAbandoned("the call was cancelled: no LM request is sent", reason="cancelled")
        lease = next(self._ids)
        waiter = _Waiter(call)
        with self._lock:
            self._waiting[lease] = waiter
        self._send(wire.LeaseRequest(lease, call, lm, max(0, tokens)))
        started = time.monotonic()
        granted = waiter.event.is_set() or waiter.event.wait(_remaining(ctx))
        with self._lock:
            self._waiting.pop(lease, None)
            ok = waiter.ok
        self.counters["waited_ms"] += int((time.monotonic() - started) * 1000)
        if ok is None:  # woken by a cancel, or the deadline passed: stop waiting
            self.counters["abandoned"] += 1
            self._send(wire.LeaseRelease(lease))
            cancelled = ctx is not None and ctx.cancelled.is_set()
            if cancelled or granted:
                raise LeaseAbandoned(
                    "the call was cancelled while its LM request waited for the budget", reason="cancelled"
                )
            raise LeaseAbandoned(
                "the call's deadline passed while its LM request waited for the LM's budget",
                reason="deadline",
            )
        if ok and ctx is not None and ctx.cancelled.is_set():  # the grant crossed the cancel
            self.counters["abandoned"] += 1
            self._send(wire.LeaseRelease(lease))
            raise LeaseAbandoned("the call was cancelled: no LM request is sent", reason="cancelled")
        if not ok:
            self.counters["refused"] += 1
            self._send(wire.LeaseRelease(lease))
            raise LeaseRefused(f"the host refused the LM request: {waiter.reason or 'no reason given'}")
        self.counters["leases"] += 1
        return Lease(self, lease)

    async def acquire_async(self, ctx: CallContext | None, lm: str, tokens: int = 0) -> Lease:
        """:meth:`acquire` for the asynchronous lane: waits on the event loop, not in a thread. The
        task's cancel (the call's ``cancel``) or its deadline ends the wait; the lease is released.

        Raises:
            LeaseAbandoned: the call was cancelled first (the task's cancel itself propagates).
            LeaseRefused: the host said no.
        """
        import asyncio

        call = ctx.id if ctx is not None else 0
        if ctx is not None and ctx.cancelled.is_set():
            raise LeaseAbandoned("the call was cancelled: no LM request is sent", reason="cancelled")
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not woken.done():
                woken.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        lease = next(self._ids)
        waiter = _Waiter(call)
        waiter.wake = wake
        with self._lock:
            self._waiting[lease] = waiter
        self._send(wire.LeaseRequest(lease, call, lm, max(0, tokens)))
        started = time.monotonic()
        try:
            if not waiter.event.is_set():
                await woken
        except BaseException:  # cancelled, or the deadline: stop waiting
            with self._lock:
                self._waiting.pop(lease, None)
            self.counters["abandoned"] += 1
            self._send(wire.LeaseRelease(lease))
            raise
        with self._lock:
            self._waiting.pop(lease, None)
            ok = waiter.ok
        self.counters["waited_ms"] += int((time.monotonic() - started) * 1000)
        if not ok or (ctx is not None and ctx.cancelled.is_set()):
            self.counters["refused" if ok is False else "abandoned"] += 1
            self._send(wire.LeaseRelease(lease))
            if ok is False:
                raise LeaseRefused(f"the host refused the LM request: {waiter.reason or 'no reason given'}")
            raise LeaseAbandoned("the call was cancelled: no LM request is sent", reason="cancelled")
        self.counters["leases"] += 1
        return Lease(self, lease)

    def on_grant(self, grant: wire.LeaseGrant) -> None:
        """(Reader) The answer to a lease: wake its thread."""
        with self._lock:
            waiter = self._waiting.get(grant.lease)
            if waiter is None:
                return
            waiter.ok = grant.ok
            waiter.reason = grant.reason
        waiter.event.set()
        if waiter.wake is not None:
            waiter.wake()

    def on_cancel(self, call: int) -> None:
        """(Reader) Call ``call`` was cancelled: wake its threads waiting for a lease."""
        with self._lock:
            waiters = [w for w in self._waiting.values() if w.call == call]
        for waiter in waiters:
            waiter.event.set()
            if waiter.wake is not None:
                waiter.wake()

    @property
    def waiting(self) -> int:
        return len(self._waiting)


def _remaining(ctx: CallContext | None) -> float | None:
    return None if ctx is None else ctx.remaining()


class Lease:
    """A granted lease; :meth:`release` it exactly once (further calls do nothing)."""

    __slots__ = ("_leases", "_released", "id", "sent_at")

    def __init__(self, leases: Leases, lease: int) -> None:
        self._leases = leases
        self.id = lease
        self._released = False
        self.sent_at: float | None = None
        """``time.monotonic()`` when the request's last byte was written (None: not sent yet)."""

    def release(self, *, status: int = 0, retry_after: float | None = None, tokens: int = 0) -> None:
        if self._released:
            return
        self._released = True
        sent_ago = None if self.sent_at is None else max(0.0, time.monotonic() - self.sent_at)
        self._leases._send(wire.LeaseRelease(self.id, status, retry_after, max(0, tokens), sent_ago))


def estimate_tokens(body: bytes) -> int:
    """Tokens a request of this body is expected to use (for a tokens-per-minute budget)."""
    return len(body) // BYTES_PER_TOKEN_ESTIMATE


def retry_after_seconds(headers: list[tuple[str, str]]) -> float | None:
    """The ``Retry-After`` (or ``retry-after-ms``) of an answer, in seconds, or None. Reads the
    provider's headers, so bounded: a number or an HTTP date, at most ``MAX_RETRY_AFTER_S``."""
    for name, value in headers:
        lowered = name.lower()
        if lowered not in ("retry-after", "retry-after-ms") or len(value) > 64:
            continue
        try:
            seconds = float(value.strip())
        except ValueError:
            if lowered == "retry-after-ms":
                continue
            try:
                date = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                continue
            seconds = date.timestamp() - time.time()
        else:
            if lowered == "retry-after-ms":
                seconds /= 1000.0
        if math.isfinite(seconds):
            return min(max(0.0, seconds), MAX_RETRY_AFTER_S)
    return None


def total_tokens(tail: bytes) -> int:
    """The last ``"total_tokens": N`` in the end of an answer (JSON or SSE), or 0."""
    marker = b'"total_tokens"'
    at = tail.rfind(marker)
    if at < 0:
        return 0
    rest = tail[at + len(marker) : at + len(marker) + 32].lstrip(b" \t\r\n:")
    digits = bytearray()
    for byte in rest:
        if 48 <= byte <= 57:
            digits.append(byte)
        else:
            break
    return int(digits) if digits else 0


class Tail:
    """Keeps the last ``USAGE_TAIL_BYTES`` of the chunks that go through :meth:`follow`."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = bytearray()

    def follow(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.data += chunk
            if len(self.data) > 2 * USAGE_TAIL_BYTES:
                del self.data[: len(self.data) - USAGE_TAIL_BYTES]
            yield chunk

    def tokens(self) -> int:
        return total_tokens(bytes(self.data[-USAGE_TAIL_BYTES:]))


def attach_async(lease: Lease | None, response: Any, *, on_release: Callable[[], None]) -> Any:
    """:func:`attach` for lm15's ``AsyncTransportResponse`` (whose release is a coroutine)."""
    original = response._release
    tail = Tail()
    if lease is not None:
        chunks = response._chunks

        async def follow() -> Any:
            async for chunk in chunks:
                tail.data += chunk
                if len(tail.data) > 2 * USAGE_TAIL_BYTES:
                    del tail.data[: len(tail.data) - USAGE_TAIL_BYTES]
                yield chunk

        response._chunks = follow()
    status = int(response.status)
    retry_after = retry_after_seconds(list(response.headers)) if status == 429 or status >= 500 else None

    async def release(body_consumed: bool) -> Any:
        try:
            return await original(body_consumed)
        finally:
            on_release()
            if lease is not None:
                lease.release(status=status, retry_after=retry_after, tokens=tail.tokens())

    response._release = release
    return response


def attach(lease: Lease | None, response: Any, *, on_release: Callable[[], None]) -> Any:
    """Call ``on_release`` and release ``lease`` (if any) when lm15's ``TransportResponse``
    ``response`` is released (its body read or the response closed), the lease with the answer's
    status, ``Retry-After`` and token count."""
    original = response._release
    if lease is None:

        def release_only(body_consumed: bool) -> Any:
            try:
                return original(body_consumed)
            finally:
                on_release()

        response._release = release_only
        return response
    tail = Tail()
    response._chunks = tail.follow(response._chunks)
    status = int(response.status)
    retry_after = retry_after_seconds(list(response.headers)) if status == 429 or status >= 500 else None

    def release(body_consumed: bool) -> Any:
        try:
            return original(body_consumed)
        finally:
            on_release()
            lease.release(status=status, retry_after=retry_after, tokens=tail.tokens())

    response._release = release
    return response
