"""The event bus: health events fanned out to subscribers, each with its own bounded buffer.

Publishing never blocks and never fails: a subscriber whose buffer is full misses events (they are
counted), and when it catches up it first receives one ``lagged`` event saying how many it missed, so it
can resync from a snapshot. A slow subscriber therefore costs the runtime nothing but its buffer.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import trio

DEFAULT_SUBSCRIBER_BUFFER: Final = 256
"""Events buffered per subscriber before it starts missing them."""
MAX_SUBSCRIBERS: Final = 1024
"""Subscribers per bus at once; one more is refused with ``TooManySubscribers``."""


@attrs.frozen
class HealthEvent:
    """One thing that happened to the runtime's health."""

    kind: str
    """``worker_state`` (a worker changed state), ``circuit`` (the breaker changed), ``launcher``
    (fallback), ``backend`` (a fallback chain switched backends: from, to, reason), ``lm_throttled`` /
    ``lm_paused`` (an LM's pool-wide budget made requests wait, or a failure paused it: docs/lm.md), or
    ``lagged`` (this subscriber missed events)."""
    data: dict[str, Any]
    """What happened; for ``worker_state``: worker_id, pid, from, to, reason."""
    backend: str = "pool"
    """Which backend it concerns (``pool``, ``bridge``, ``mock``)."""
    seq: int = 0
    """Bus-wide sequence number (0 for ``lagged``, which is per subscriber)."""
    time: float = attrs.field(factory=time.time)
    """Wall-clock time, seconds since the epoch."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "data": self.data,
            "backend": self.backend,
            "seq": self.seq,
            "time": self.time,
        }


class TooManySubscribers(RuntimeError):
    """The bus already has ``MAX_SUBSCRIBERS`` subscribers."""


class Subscription:
    """Events as they happen. ``async for event in subscription``; ``missed`` counts dropped events."""

    def __init__(self, buffer: int, backend: str = "pool") -> None:
        self._events: collections.deque[HealthEvent] = collections.deque()
        self._buffer = buffer
        self._backend = backend
        self._missed_pending = 0
        self.missed = 0
        """Events this subscriber missed in all (its buffer was full)."""
        self._arrived = trio.Event()
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._events)

    def _offer(self, event: HealthEvent) -> None:
        if len(self._events) >= self._buffer:
            self._missed_pending += 1
            self.missed += 1
            return
        if self._missed_pending:
            # The gap comes before this event: mark it in the stream where it happened.
            self._events.append(
                HealthEvent("lagged", {"missed": self._missed_pending}, backend=event.backend)
            )
            self._missed_pending = 0
            if len(self._events) >= self._buffer:
                self._missed_pending += 1
                self.missed += 1
                return
        self._events.append(event)
        self._arrived.set()

    def receive_nowait(self) -> HealthEvent:
        """The next event, or ``trio.WouldBlock``."""
        if self._events:
            return self._events.popleft()
        if self._missed_pending:
            missed, self._missed_pending = self._missed_pending, 0
            return HealthEvent("lagged", {"missed": missed}, backend=self._backend)
        raise trio.WouldBlock

    async def receive(self) -> HealthEvent:
        """Wait for the next event. Raises ``trio.EndOfChannel`` once the bus closed and all is read."""
        while True:
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                if self._closed:
                    raise trio.EndOfChannel from None
                self._arrived = trio.Event()
                await self._arrived.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> HealthEvent:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _close(self) -> None:
        self._closed = True
        self._arrived.set()


class EventBus:
    """Fan-out of health events; ``publish`` is synchronous and never blocks."""

    def __init__(self, *, buffer: int = DEFAULT_SUBSCRIBER_BUFFER, backend: str = "pool") -> None:
        self.buffer = buffer
        self.backend = backend
        self._subscribers: set[Subscription] = set()
        self._seq = itertools.count(1)
        self.published = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any], *, backend: str | None = None) -> HealthEvent:
        event = HealthEvent(kind, data, backend=backend or self.backend, seq=next(self._seq))
        self.published += 1
        for subscription in self._subscribers:
            subscription._offer(event)
        return event

    @asynccontextmanager
    async def subscribe(self, *, buffer: int | None = None) -> AsyncIterator[Subscription]:
        """Receive every event published while the block runs (bounded: see the module doc).

        Entering is a checkpoint, taken once the subscription is in place: what is published meanwhile
        is already buffered for it. Cancelled there, nothing is left subscribed."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(f"the event bus already has {MAX_SUBSCRIBERS} subscribers")
        size = self.buffer if buffer is None else buffer
        if size < 1:
            raise ValueError(f"buffer must be at least 1 event, not {size}")
        subscription = Subscription(size, backend=self.backend)
        self._subscribers.add(subscription)
        try:
            await trio.lowlevel.checkpoint()
            yield subscription
        finally:
            self._subscribers.discard(subscription)
            subscription._close()

    def close(self) -> None:
        """End every subscription (their iterators stop once drained)."""
        for subscription in self._subscribers:
            subscription._close()
