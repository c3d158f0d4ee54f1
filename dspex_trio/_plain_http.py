"""Plain HTTP at the websocket endpoint: a request that is no websocket handshake gets a readable answer.

A browser, ``curl`` or a load balancer's probe pointed at ``http://host:port/`` sends a request without
``Upgrade: websocket``. wsproto refuses it before the websocket server's handler ever sees it, with an
empty ``400``. So each accepted connection is wrapped (:class:`PlainHttpListener`): its first bytes are
read up to the end of the request head (at most ``MAX_HEAD_BYTES``); a websocket handshake is handed on
to trio-websocket byte for byte, anything else is answered here (``answer(peer, head)`` gives the
response: ``426 Upgrade Required`` with a body saying what the endpoint is, see
:func:`upgrade_required`) and the connection is closed. A later page at ``/`` (a dashboard) or a health
probe would be answered at the same place.

The head is read inside trio-websocket's handshake, so ``handshake_timeout`` bounds it; a head that
does not end within ``MAX_HEAD_BYTES`` is handed on as it is (wsproto refuses it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from dspex_trio._util import WrappedStream

__all__ = ["MAX_HEAD_BYTES", "PlainHttpListener", "is_websocket_upgrade_untrusted", "upgrade_required"]

MAX_HEAD_BYTES: Final = 16 * 1024
"""Bytes of a request head read before deciding (h11's own limit on an incomplete head, 16 KiB)."""
READ_BYTES: Final = 4096
"""Bytes asked of the socket per read while looking for the end of the head."""
HEAD_END: Final = b"\r\n\r\n"

Answer = Callable[[str, bytes], bytes]
"""``answer(peer_address, request_head) -> the full HTTP response`` for a request that is no handshake."""


def is_websocket_upgrade_untrusted(head: bytes) -> bool:
    """Whether an HTTP request head (peer bytes, up to its blank line) asks for a websocket upgrade: an
    ``Upgrade`` header whose comma-separated tokens include ``websocket`` (any case). Anything malformed
    is simply not one."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if (
            sep
            and name.strip().lower() == b"upgrade"
            and any(token.strip().lower() == b"websocket" for token in value.split(b","))
        ):
            return True
    return False


def upgrade_required(head: bytes, text: str) -> bytes:
    """A ``426 Upgrade Required`` response to the request ``head`` with ``text`` as its plain-text body
    (none for ``HEAD``); the connection closes after it."""
    body = text.encode("utf-8")
    lines = [
        b"HTTP/1.1 426 Upgrade Required",
        b"Upgrade: websocket",
        b"Connection: close",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
    ]
    method = head.split(b" ", 1)[0]
    return b"\r\n".join(lines) + HEAD_END + (b"" if method == b"HEAD" else body)


class _HeadFirstStream(WrappedStream):
    """A server-side connection whose request head is inspected before trio-websocket reads it."""

    def __init__(self, stream: trio.abc.Stream, answer: Answer) -> None:
        super().__init__(stream)
        self._answer = answer
        self._decided = False
        self._answered = False
        self._pending = b""
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)  # under TLS: the TCP one
        try:
            self.address = str(sock.getpeername()[0]) if sock is not None else "unknown"
        except OSError:  # the peer is already gone
            self.address = "unknown"

    def __repr__(self) -> str:
        # trio-websocket names a stream that is not a SocketStream by its repr (``request.remote``): the
        # peer's address, as it would give for the socket itself (the server caps connections per peer).
        return self.address

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._decided:
            await self._decide()
        if self._answered:
            return b""
        if self._pending:
            size = len(self._pending) if max_bytes is None else max_bytes
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def _decide(self) -> None:
        head = b""
        while HEAD_END not in head and len(head) < MAX_HEAD_BYTES:
            data = await self._stream.receive_some(READ_BYTES)
            if not data:
                break
            head += data
        self._decided = True
        end = head.find(HEAD_END)
        if end < 0 or is_websocket_upgrade_untrusted(head[:end]):
            self._pending = head  # a handshake, or no complete head: wsproto decides
            return
        self._answered = True
        try:
            await self._stream.send_all(self._answer(self.address, head[:end]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left without reading the answer
        await self._stream.aclose()


class PlainHttpListener(trio.abc.Listener[trio.abc.Stream]):
    """Wraps a TCP listener for trio-websocket: each connection's request head is looked at first, and a
    request that is no websocket handshake is answered with ``answer(peer, head)`` (see the module)."""

    def __init__(self, listener: trio.abc.Listener[trio.abc.Stream], answer: Answer) -> None:
        self.listener = listener
        self._answer = answer

    async def accept(self) -> trio.abc.Stream:
        return _HeadFirstStream(await self.listener.accept(), self._answer)

    async def aclose(self) -> None:
        await self.listener.aclose()
