"""The remote client's websocket: wsproto (sans-IO) over one trio stream, read by the task that uses it.

trio-websocket (the server's transport) gives each connection a reader task that hands every message to
its user through a memory channel. The client needs no such hop: its connector task reads the socket
itself (:meth:`ClientWebsocket.receive_messages`: one read, every complete text message in it), answers
pings and the closing handshake, and delivers each message to the caller waiting for it at once, so
that the reply and the events of an execution that arrive in one read cost one wake-up. Callers write
their own requests (:meth:`ClientWebsocket.send_text`), one whole frame at a time under one lock.

:func:`open_client_websocket` makes the opening handshake (``Host``, the subprotocol, the caller's
headers) and closes the stream when its block ends. Errors: :class:`WebsocketClosed` once the connection
is closed (by either side, or the TCP connection broke), ``HandshakeRefused`` when the server refused the
handshake, ``RemoteProtocolError`` when the server broke the websocket protocol (a bad frame, a binary
frame: the API is text only, a message over ``max_message_size``); ``OSError`` /
``trio.BrokenResourceError`` from the network.
"""

from __future__ import annotations

import itertools
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError as WsprotoRemoteError

from dspex_trio._client_protocol import HandshakeRefused, RemoteProtocolError

RECEIVE_BUFFER_BYTES: Final = 64 * 1024
"""Bytes read from the socket at once."""
MAX_REJECT_BODY_BYTES: Final = 4096
"""Longest refusal body kept (the server's reason for refusing the handshake)."""
ABNORMAL_CLOSURE: Final = 1006
"""The close code of a connection that ended without a closing handshake (RFC 6455)."""


class WebsocketClosed(Exception):
    """The connection is closed: ``code`` and ``reason`` of the closing handshake (1006 if there was
    none: the TCP connection broke or ended)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


class ClientWebsocket:
    """One open client connection (made by :func:`open_client_websocket`)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: WSConnection,
        subprotocol: str | None,
        *,
        max_message_size: int,
    ) -> None:
        self.subprotocol = subprotocol
        """The subprotocol the server accepted."""
        self._stream = stream
        self._ws = connection
        self._max_message_size = max_message_size
        self._write_lock = trio.StrictFIFOLock()
        self._parts: list[str] = []
        self._size = 0
        self._closed: WebsocketClosed | None = None
        self._close_received = trio.Event()
        self._pongs: dict[bytes, trio.Event] = {}
        self._ping_ids = itertools.count()
        self._early: list[Event] = []
        """Events that came with the handshake's answer (delivered by the first read)."""

    @property
    def closed(self) -> WebsocketClosed | None:
        """Why the connection closed, or None while it is open."""
        return self._closed

    # -- writing ----------------------------------------------------------------------------------------
    async def _send(self, event: Event) -> None:
        if self._closed is not None:
            raise self._closed
        if self._ws.state is not ConnectionState.OPEN and not isinstance(event, CloseConnection):
            raise WebsocketClosed(1000, "the connection is closing")
        lock = self._write_lock
        try:
            lock.acquire_nowait()  # the usual case: no other write in progress (and no extra yield)
        except trio.WouldBlock:
            await lock.acquire()
        try:
            data = self._ws.send(event)  # in the lock: frames reach the socket in the order made
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = WebsocketClosed(ABNORMAL_CLOSURE, "the connection broke")
            raise self._closed from None
        finally:
            lock.release()

    async def send_text(self, text: str) -> None:
        """Send one text message (``WebsocketClosed`` if the connection is closed or breaks). A
        cancellation in the middle would leave a partial frame: shield the call (the client bounds it)."""
        await self._send(TextMessage(data=text))

    async def ping(self) -> None:
        """Send a ping and wait for its pong (bound it with a timeout)."""
        payload = next(self._ping_ids).to_bytes(8, "big")
        pong = self._pongs[payload] = trio.Event()
        try:
            await self._send(Ping(payload=payload))
            await pong.wait()
        finally:
            self._pongs.pop(payload, None)
        if self._closed is not None:
            raise self._closed

    # -- reading -----------------------------------------------------------------------------------------
    async def receive_messages(self) -> list[str]:
        """Read once; the complete text messages of what was read (maybe none: a partial one, a ping).

        Raises:
            WebsocketClosed: the server closed the connection (the closing handshake answered), or the
                TCP connection ended.
            RemoteProtocolError: a malformed frame, a binary frame, or a message over the size limit.
        """
        if self._early:
            events, self._early = self._early, []
        else:
            if self._closed is not None:
                raise self._closed
            try:
                data = await self._stream.receive_some(RECEIVE_BUFFER_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            try:
                self._ws.receive_data(bytes(data) or None)
                events = list(self._ws.events())
            except WsprotoRemoteError as exc:
                raise RemoteProtocolError(f"the server broke the websocket protocol: {exc}") from None
            if not data and not any(isinstance(e, CloseConnection) for e in events):
                events.append(CloseConnection(code=ABNORMAL_CLOSURE, reason="the connection ended"))
        return await self._take(events)

    async def _take(self, events: list[Event]) -> list[str]:
        messages: list[str] = []
        for event in events:
            if type(event) is TextMessage:
                if event.message_finished and not self._parts:
                    if len(event.data) > self._max_message_size:
                        raise self._too_big(len(event.data))
                    messages.append(event.data)
                    continue
                self._parts.append(event.data)
                self._size += len(event.data)
                if self._size > self._max_message_size:
                    raise self._too_big(self._size)
                if event.message_finished:
                    messages.append("".join(self._parts))
                    self._parts, self._size = [], 0
            elif isinstance(event, BytesMessage):
                raise RemoteProtocolError("the server sent a binary frame (dspex.v1 is text frames only)")
            elif isinstance(event, Ping):
                if self._closed is None:
                    await self._send(event.response())
            elif isinstance(event, Pong):
                waiter = self._pongs.get(bytes(event.payload))
                if waiter is not None:
                    waiter.set()
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.OPEN and event.code != ABNORMAL_CLOSURE:
                    # wsproto's own verdict on a frame it could not parse (no close frame came)
                    raise RemoteProtocolError(f"the server broke the websocket protocol: {event.reason}")
                await self._on_close(event)
                if messages:  # deliver what came before the close first; the next read raises
                    return messages
                assert self._closed is not None
                raise self._closed
        return messages

    def _too_big(self, size: int) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"the server sent a message of {size:,} characters; this client takes at most "
            f"{self._max_message_size:,} (ClientOptions.max_message_size)"
        )

    async def _on_close(self, event: CloseConnection) -> None:
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            try:
                await self._send(event.response())  # the closing handshake's answer
            except WebsocketClosed:
                pass
        self._closed = self._closed or WebsocketClosed(event.code, event.reason or "")
        self._close_received.set()
        for waiter in self._pongs.values():
            waiter.set()

    # -- closing -----------------------------------------------------------------------------------------
    async def aclose(self, code: int = 1000, reason: str = "", *, wait: bool = True) -> None:
        """Start the closing handshake (if still open) and, with ``wait``, wait for the server's answer,
        which the connection's reader receives; bound it with a timeout. The stream itself is closed when
        the block of :func:`open_client_websocket` ends."""
        if self._closed is None and self._ws.state is ConnectionState.OPEN:
            try:
                await self._send(CloseConnection(code=code, reason=reason))
            except WebsocketClosed:
                return
            if wait:  # the reader goes on reading until the answer (frames sent before it included)
                await self._close_received.wait()
            else:
                self.abort()
        else:
            await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Consider the connection closed now (a write outlasted its bound: the stream may hold half a
        frame); the stream is closed when the block of :func:`open_client_websocket` ends."""
        self._closed = self._closed or WebsocketClosed(ABNORMAL_CLOSURE, "aborted")
        self._close_received.set()


def _target(url: str) -> tuple[str, int, str, str, bool]:
    """``(host, port, Host header, request target, tls)`` of a ``ws://`` or ``wss://`` URL."""
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    shown = f"[{host}]" if ":" in host else host
    header = shown if port == (443 if tls else 80) else f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, header, target, tls


@asynccontextmanager
async def open_client_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    subprotocols: list[str],
    headers: list[tuple[bytes, bytes]],
    max_message_size: int,
    close_timeout: float,
) -> AsyncIterator[ClientWebsocket]:
    """Connect to ``url`` and make the opening handshake (bound it with a timeout); the connection for
    the block, whose stream is closed (bounded by ``close_timeout``) when the block ends.

    Raises:
        HandshakeRefused: the server answered the handshake with an HTTP error (status and body).
        RemoteProtocolError: its answer was not a websocket handshake's.
        OSError, trio.BrokenResourceError: the TCP or TLS connection could not be made.
    """
    host, port, host_header, target, tls = _target(url)
    stream: trio.abc.Stream
    if tls:
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context, https_compatible=True)
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        connection = WSConnection(ConnectionType.CLIENT)
        request = Request(host=host_header, target=target, subprotocols=subprotocols, extra_headers=headers)
        await stream.send_all(connection.send(request))
        accepted: AcceptConnection | None = None
        refused: RejectConnection | None = None
        body = b""
        early: list[Event] = []
        while accepted is None:
            data = await stream.receive_some(RECEIVE_BUFFER_BYTES)
            try:
                connection.receive_data(bytes(data) or None)
                events = list(connection.events())
            except WsprotoRemoteError as exc:
                raise RemoteProtocolError(f"{url} did not answer as a websocket server: {exc}") from None
            for i, event in enumerate(events):
                if isinstance(event, AcceptConnection):
                    accepted, early = event, events[i + 1 :]
                    break
                if isinstance(event, RejectConnection):
                    refused = event
                    if not event.has_body:
                        raise HandshakeRefused(event.status_code, "")
                elif isinstance(event, RejectData):
                    body = (body + bytes(event.data))[:MAX_REJECT_BODY_BYTES]
                    if event.body_finished:
                        assert refused is not None
                        raise HandshakeRefused(refused.status_code, body.decode("utf-8", "replace").strip())
            if not data:
                if refused is not None:
                    raise HandshakeRefused(refused.status_code, body.decode("utf-8", "replace").strip())
                raise RemoteProtocolError(f"{url} closed the connection during the handshake")
        websocket = ClientWebsocket(
            stream, connection, accepted.subprotocol, max_message_size=max_message_size
        )
        websocket._early = early
        yield websocket
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(close_timeout) as bound:
            bound.shield = True
            await stream.aclose()
