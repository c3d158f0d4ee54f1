"""One server-side HTTP/1.1 connection over a Trio stream (h11), with the limits of the fake LM server:
a request head of at most ``MAX_HEADER_BYTES``, a body read only up to the caller's limit, and a bounded
linger after an error reply that closes the connection."""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, Final

import h11
import trio

from dspex_trio.testing._fake_answers import dumps

MAX_HEADER_BYTES: Final = 64 * 1024
"""Largest request head (request line and headers), in bytes; a larger one gets ``431``."""
RECEIVE_CHUNK_BYTES: Final = 64 * 1024
"""Bytes read from a socket per ``receive_some`` call."""
LINGER_TIMEOUT_S: Final = 1.0
"""After an error reply that closes the connection, seconds spent draining the unread request, so the
client reads the reply instead of a connection reset."""
LINGER_MAX_BYTES: Final = 16 * 1024 * 1024
"""Most bytes drained from a client after an error reply that closes the connection."""


class PayloadTooLarge(Exception):
    """A request body over the limit the server reads (``read_body``) or was told (``Content-Length``)."""


class HttpConnection:
    """One server-side HTTP/1.1 connection: an h11 state machine over a Trio stream."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, *, server_header: bytes = b"") -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.server_header = server_header
        self.bytes_received = 0
        """Bytes read from the client so far (requests, bodies, and what ``drain_and_close`` drops)."""

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    await self.send(h11.InformationalResponse(status_code=100, headers=[]))
                data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                self.bytes_received += len(data)
                self.h11.receive_data(bytes(data))
                continue
            return event

    async def read_body(self, limit: int) -> bytes:
        """The request body, read to its end; :class:`PayloadTooLarge` as soon as more than ``limit``
        bytes came (so at most ``limit`` + one ``RECEIVE_CHUNK_BYTES`` read are ever held)."""
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise PayloadTooLarge
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a request body")

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def send_response(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"application/json",
        headers: Sequence[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        all_headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"server", self.server_header),
            *headers,
        ]
        if close:
            all_headers.append((b"connection", b"close"))
        # Head and body in one write: one segment, no Nagle/delayed-ACK interplay at all.
        data = (
            self.h11.send(h11.Response(status_code=status, headers=all_headers, reason=_reason(status)))
            or b""
        )
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def send_json(self, status: int, obj: Any, *, close: bool = False) -> None:
        await self.send_response(status, dumps(obj), close=close)

    async def wait_for_client_close(self) -> None:
        """Read (and drop) whatever the client sends until it closes its side (or the server stops)."""
        while data := await self.stream.receive_some(RECEIVE_CHUNK_BYTES):
            self.bytes_received += len(data)

    async def drain_and_close(self) -> None:
        """Half-close our side, then read (and drop) what the client still sends until it closes, the
        timeout passes or :data:`LINGER_MAX_BYTES` were read."""
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        with trio.move_on_after(LINGER_TIMEOUT_S):
            drained = 0
            while drained < LINGER_MAX_BYTES:
                data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                if not data:
                    return
                drained += len(data)
                self.bytes_received += len(data)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
