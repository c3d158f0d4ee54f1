"""One watcher over the connections whose completions wait for their answer (``fake-lm``): it notices
each client's close (end of stream or reset) as soon as the kernel reports it, and counts and stamps it
there, for all of them in one pass.

A task per waiting request, each woken by its own socket, stamps a thousand disconnects that arrive
together one after the other, each after the previous one's whole wake-up (reading the end of stream,
unwinding, closing): measured ~60-70 ms of ``fake-lm``'s CPU for 1,000, on 2 cores shared with the
clients being measured, so the instrument itself put tens of milliseconds on the last stamp. Here one
``epoll`` set holds the waiting connections; the watcher task wakes once for what is ready, stamps each
closed connection as it sees it (a few microseconds apart), then wakes the requests' tasks a batch at a
time, looking at the set again between batches, so that their unwinding does not delay the next
closes' stamps. The stamp is still ``fake-lm``'s own observation of the close.

Linux only (``select.epoll``); elsewhere ``fake-lm`` waits with a task per request as before.
"""

from __future__ import annotations

import os
import select
from collections import deque
from collections.abc import Callable
from typing import Final

import trio

from dspex_trio.testing._http import RECEIVE_CHUNK_BYTES, HttpConnection

MAX_EVENTS_PER_POLL: Final = 1024
"""Ready connections taken from the ``epoll`` set in one call, a count (more are taken at once after)."""
WAKE_BATCH: Final = 32
"""Requests' tasks woken at a time after their client closed, a count: between two such batches the
watcher looks at the set again, so closes that come while earlier ones unwind (a second worker's
burst while the first's 500 tasks close their sockets) are stamped within one batch's time, not after
all of them."""

_CLOSED: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0


def available() -> bool:
    """This platform has ``epoll`` (the watcher's only backend)."""
    return hasattr(select, "epoll")


class Watch:
    """One waiting request's connection, watched until the request stops waiting or its client closes."""

    __slots__ = ("closed", "fd", "gone", "http")

    def __init__(self, fd: int, http: HttpConnection) -> None:
        self.fd = fd
        self.http = http
        self.closed = False
        """The watcher saw the client close the connection (and counted and stamped it)."""
        self.gone = trio.Event()
        """Set by the watcher after ``closed``, when it wakes the request's task."""


class CloseWatcher:
    """The ``epoll`` set of the waiting connections and the task that watches it (:meth:`serve`)."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        self._on_close = on_close
        self._epoll: select.epoll | None = None
        self._watches: dict[int, Watch] = {}
        self._to_wake: deque[Watch] = deque()
        """Watches whose close was counted and stamped, whose tasks are not woken yet."""

    def watch(self, stream: trio.SocketStream, http: HttpConnection) -> Watch:
        """Watch ``stream`` (``http``'s connection) from now on (a client that closed it already is
        seen at once: the set is level-triggered). Call :meth:`unwatch` when the request stops waiting."""
        if self._epoll is None:
            raise RuntimeError("the close watcher is not running")
        fd = stream.socket.fileno()
        watch = Watch(fd, http)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._watches[fd] = watch
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Stop watching (nothing if the watcher saw the close, or stopped)."""
        if self._watches.get(watch.fd) is watch:
            del self._watches[watch.fd]
            if self._epoll is not None:
                self._epoll.unregister(watch.fd)

    @property
    def watching(self) -> int:
        """Connections watched now."""
        return len(self._watches)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled (start with ``nursery.start``)."""
        epoll = select.epoll()
        self._epoll = epoll
        try:
            task_status.started()
            while True:
                if not self._to_wake:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                while events := epoll.poll(0, MAX_EVENTS_PER_POLL):
                    self._seen(events)
                for _ in range(min(WAKE_BATCH, len(self._to_wake))):
                    self._to_wake.popleft().gone.set()
                if self._to_wake:
                    await trio.lowlevel.checkpoint()  # the woken tasks run, then the set is looked at
        finally:
            self._epoll = None
            self._watches.clear()
            for watch in self._to_wake:
                watch.gone.set()
            self._to_wake.clear()
            epoll.close()

    def _seen(self, events: list[tuple[int, int]]) -> None:
        """Count and stamp every connection of ``events`` that its client closed, and queue its task
        to be woken. What a client sends while it waits is read and dropped (one read per event: a
        client that keeps sending cannot hold the watcher)."""
        assert self._epoll is not None
        for fd, flags in events:
            watch = self._watches.get(fd)
            if watch is None:  # pragma: no cover - unregistered in the same call
                continue
            if not flags & _CLOSED:
                try:
                    data = os.read(fd, RECEIVE_CHUNK_BYTES)
                except BlockingIOError:  # pragma: no cover - nothing after all
                    continue
                except OSError:  # reset
                    data = b""
                if data:
                    watch.http.bytes_received += len(data)
                    continue
            del self._watches[fd]
            self._epoll.unregister(fd)
            watch.closed = True
            self._on_close()
            self._to_wake.append(watch)
