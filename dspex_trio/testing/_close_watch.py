"""One watcher over the connections whose completions wait for their answer (``fake-lm``): it notices
each client's close (end of stream or reset) as soon as the kernel reports it, and counts and stamps it
there, for all of them in one pass.

A task per waiting request, each woken by its own socket, stamps a thousand disconnects that arrive
together one after the other, each after the previous one's whole wake-up (reading the end of stream,
unwinding, closing): measured ~60-70 ms of ``fake-lm``'s CPU for 1,000, on 2 cores shared with the
clients being measured, so the instrument itself put tens of milliseconds on the last stamp. Here one
``epoll`` set holds the waiting connections; the watcher task wakes once for what is ready, stamps each
closed connection as it sees it (a few microseconds apart), then wakes the requests' tasks, which unwind
afterwards. The stamp is still ``fake-lm``'s own observation of the close.

Linux only (``select.epoll``); elsewhere ``fake-lm`` waits with a task per request as before.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable
from typing import Final

import trio

from dspex_trio.testing._http import RECEIVE_CHUNK_BYTES, HttpConnection

MAX_EVENTS_PER_POLL: Final = 1024
"""Ready connections taken from the ``epoll`` set in one call, a count (more are taken at once after)."""

_CLOSED: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0


def available() -> bool:
    """This platform has ``epoll`` (the watcher's only backend)."""
    return hasattr(select, "epoll")


class Watch:
    """One waiting request's connection, watched until the request stops waiting or its client closes."""

    __slots__ = ("fd", "gone", "http")

    def __init__(self, fd: int, http: HttpConnection) -> None:
        self.fd = fd
        self.http = http
        self.gone = trio.Event()
        """Set by the watcher when the client closed the connection (already counted and stamped)."""


class CloseWatcher:
    """The ``epoll`` set of the waiting connections and the task that watches it (:meth:`serve`)."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        self._on_close = on_close
        self._epoll: select.epoll | None = None
        self._watches: dict[int, Watch] = {}

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
                await trio.lowlevel.wait_readable(epoll.fileno())
                while events := epoll.poll(0, MAX_EVENTS_PER_POLL):
                    self._seen(events)
        finally:
            self._epoll = None
            self._watches.clear()
            epoll.close()

    def _seen(self, events: list[tuple[int, int]]) -> None:
        """Stamp every connection of ``events`` that its client closed, first, then wake their tasks.
        What a client sends while it waits is read and dropped (one read per event: a client that
        keeps sending cannot hold the watcher)."""
        assert self._epoll is not None
        closed: list[Watch] = []
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
            self._on_close()
            closed.append(watch)
        for watch in closed:
            watch.gone.set()
