"""The LM requests in flight, by the worker call they belong to, so that a ``cancel`` closes their
connections: the provider sees its client go away and stops generating (no more tokens are spent on
an answer nobody reads), and the thread blocked reading that answer wakes at once (what it then
returns or raises is discarded: the call's terminal frame was already sent).

``bridge_child._lmguard`` registers the socket of each request its transports (the threads' and the
asynchronous lane's) send for a worker call, until its answer is released; the reader calls
:func:`abort` when the call's ``cancel`` arrives. No dspy here.
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge_child._context import CallContext

_lock = threading.Lock()
_sockets: dict[int, set[Any]] = {}
"""The sockets of the requests in flight, by call id (a worker's call ids are unique while pending)."""


def register(ctx: CallContext, sock: Any) -> None:
    """``sock`` carries a request of ``ctx`` from now on (closed at once if ``ctx`` is cancelled
    already: a cancel may come between the start of a request and this)."""
    with _lock:
        _sockets.setdefault(ctx.id, set()).add(sock)
    if ctx.cancelled.is_set():
        abort(ctx.id)


def unregister(ctx: CallContext, sock: Any) -> None:
    with _lock:
        held = _sockets.get(ctx.id)
        if held is not None:
            held.discard(sock)
            if not held:
                del _sockets[ctx.id]


def abort(call: int) -> int:
    """Close the connections of call ``call``'s requests in flight (both directions: the peer gets a
    FIN, a blocked read returns); how many there were."""
    with _lock:
        held = _sockets.pop(call, set())
    for sock in held:
        try:
            if isinstance(sock, socket.socket):
                # The plain socket's shutdown, also for a TLS socket: it wakes the reader without
                # touching the TLS state another thread is using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            else:  # asyncio's view of a socket (``TransportSocket``): its ``shutdown`` is the socket's
                # own, one syscall (a new socket object over the descriptor would cost ~4x as much)
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass  # already closed
    return len(held)


def in_flight() -> int:
    """Requests registered now (all calls)."""
    with _lock:
        return sum(len(held) for held in _sockets.values())
