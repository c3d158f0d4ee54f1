"""The endpoint's direct write: a message the socket takes at once is written by the task that sends it.

The connection's writer task (``_websocket._Connection._writer``) costs every message a channel hand-off,
a task wake-up, a shielded cancel scope, trio-websocket's stream lock and two scheduler passes in
``send_all``. When nothing is queued before a message and no write is in progress (the stream lock is
free), the sending task frames it and writes it with ``os.write`` on the non-blocking TCP socket, with no
await: a socket that takes the whole frame (the common case: the kernel's send buffer has room) leaves the
message sent, in order. Otherwise nothing was written and the message is queued as before, or part of the
frame was written and the sender finishes that frame itself under the stream lock, taken before any await
so that nothing (a pong, another message) can come between the two parts; that write is shielded and
bounded by ``slow_consumer_grace`` (a client that stops reading is closed with 1008, as the queue does).

Plain ``ws://`` over TCP on POSIX only: under TLS (and elsewhere) every message goes through the writer.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import trio

from dspex_trio._util import WrappedStream

__all__ = ["direct_socket", "write_nowait"]


def direct_socket(stream: Any) -> Any | None:
    """The TCP socket under a connection's stream (trio-websocket's ``_stream``), when the endpoint may
    write to it directly: a plain TCP stream (possibly under the plain-HTTP check) on POSIX; None
    otherwise (TLS, another stream, Windows)."""
    if sys.platform == "win32":  # pragma: no cover - os.write takes no socket there
        return None
    while isinstance(stream, WrappedStream):
        stream = stream.transport
    if not isinstance(stream, trio.SocketStream):
        return None
    return stream.socket


def write_nowait(sock: Any, data: bytes | memoryview) -> int:
    """Write what the non-blocking socket takes of ``data`` now, without waiting: the bytes written (0 when
    its buffer is full).

    Raises:
        OSError: the socket is closed (its ``fileno()`` is -1: ``EBADF``) or broken.
    """
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0
