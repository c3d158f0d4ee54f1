"""The remote client's websocket: sans-IO protocols over one trio stream, read by the task that uses it.

trio-websocket (the server's transport) gives each connection a reader task that hands every message to
its user through a memory channel. The client needs no such hop: its connector task reads the socket
itself (:meth:`ClientWebsocket.receive_messages`: one read, every complete text message in it), answers
pings and the closing handshake, and delivers each message to the caller waiting for it at once, so
that the reply and the events of an execution that arrive in one read cost one wake-up. Callers write
their own requests (:meth:`ClientWebsocket.send_text`), one whole frame at a time under one lock.

On a plain TCP connection (POSIX) the hot path skips Trio's per-operation machinery, as the worker
handle does for its pipe: a request whose frame the socket takes whole at once is written there and then
(``os.write`` on the non-blocking socket: no lock, no cancel scope, no scheduler pass;
:meth:`ClientWebsocket.send_text_nowait`), and frames queued while a write is in progress leave with it,
in one write; the reader waits with ``trio.lowlevel.wait_readable`` and reads with ``os.read``. TLS
streams go through the stream as before.

:func:`open_client_websocket` makes the opening handshake (``Host``, the subprotocol, the caller's
headers) with wsproto, then frames the messages with the ``websockets`` library's sans-IO protocol
(``websockets.protocol.Protocol``: its frame parser and its C masking cost the client about a third of
wsproto's per message; docs/benchmarks.md, family 7), and closes the stream when its block ends. Errors: :class:`WebsocketClosed` once the connection
is closed (by either side, or the TCP connection broke), ``HandshakeRefused`` when the server refused the
handshake, ``RemoteProtocolError`` when the server broke the websocket protocol (a bad frame, a binary
frame: the API is text only, a message over ``max_message_size``); ``OSError`` /
``trio.BrokenResourceError`` from the network.
"""

from __future__ import annotations

import itertools
import os
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import trio
from websockets.exceptions import InvalidState, PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, RejectData, Request
from wsproto.utilities import RemoteProtocolError as WsprotoRemoteError

from dspex_trio._client_protocol import HandshakeRefused, RemoteProtocolError

RECEIVE_BUFFER_BYTES: Final = 64 * 1024
"""Bytes read from the socket at once."""
MAX_ANSWER_HEAD_BYTES: Final = 64 * 1024
"""Longest handshake answer head read before handing it to wsproto whole (which then refuses it)."""
MAX_REJECT_BODY_BYTES: Final = 4096
"""Longest refusal body kept (the server's reason for refusing the handshake)."""
ABNORMAL_CLOSURE: Final = 1006
"""The close code of a connection that ended without a closing handshake (RFC 6455)."""
MAX_UTF8_BYTES_PER_CHARACTER: Final = 4
"""A message of ``max_message_size`` characters is at most this many times as long in bytes (UTF-8)."""
MAX_READS_WITHOUT_YIELD: Final = 16
"""Reads that found data at once, in a row, before the reader yields to the scheduler anyway (a server
that keeps the socket full never starves the client's other tasks)."""
_HEAD_END = re.compile(rb"\r?\n\r?\n")
"""The end of an HTTP response head (the handshake's answer); the websocket frames follow it."""


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
        subprotocol: str | None,
        *,
        max_message_size: int,
        early: bytes = b"",
    ) -> None:
        self.subprotocol = subprotocol
        """The subprotocol the server accepted."""
        self._stream = stream
        # a message over max_message_size characters is refused by its byte size in the frame header,
        # before its payload is read (or, between 1 and 4 bytes a character, once decoded: _too_big)
        self._ws = Protocol(
            Side.CLIENT, state=State.OPEN, max_size=max_message_size * MAX_UTF8_BYTES_PER_CHARACTER
        )
        self._max_message_size = max_message_size
        self._write_lock = trio.StrictFIFOLock()
        self._fd = _plain_socket_fd(stream)
        """The TCP socket's descriptor (non-blocking) when the stream is a plain trio socket on POSIX: writes
        that fit and reads go to it directly, without Trio's per-operation machinery; None (TLS, another
        platform): every byte goes through the stream."""
        self._unsent = b""
        """The rest of a frame the socket took only part of at once (written first by the next flush)."""
        self._reads_in_a_row = 0
        self._drained = False
        """The last read did not fill the buffer: the next one waits for readiness first."""
        self._parts: list[bytes | bytearray | memoryview] = []
        self._closed: WebsocketClosed | None = None
        self._close_received = trio.Event()
        self._pongs: dict[bytes, trio.Event] = {}
        self._ping_ids = itertools.count()
        self._early = early
        """Bytes that came after the handshake's answer, in its last read (delivered by the first read)."""

    @property
    def closed(self) -> WebsocketClosed | None:
        """Why the connection closed, or None while it is open."""
        return self._closed

    # -- writing ----------------------------------------------------------------------------------------
    async def _flush(self) -> None:
        """Write what the protocol has to send (frames made by callers, pongs, the close answer), in the
        order it made them; under the write lock, so that frames never interleave."""
        lock = self._write_lock
        try:
            lock.acquire_nowait()  # the usual case: no other write in progress (and no extra yield)
        except trio.WouldBlock:
            await lock.acquire()
        try:
            data = self._unsent + b"".join(self._ws.data_to_send())
            self._unsent = b""
            if data:
                await self._stream.send_all(data)
            else:
                await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._closed = WebsocketClosed(ABNORMAL_CLOSURE, "the connection broke")
            raise self._closed from None
        finally:
            lock.release()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed
        if self._ws.state is not State.OPEN:
            raise WebsocketClosed(1000, "the connection is closing")

    async def send_text(self, text: str) -> None:
        """Send one text message (``WebsocketClosed`` if the connection is closed or breaks). A
        cancellation in the middle would leave a partial frame: shield the call (the client bounds it)."""
        if not self.send_text_nowait(text):
            await self._flush()

    def send_text_nowait(self, text: str) -> bool:
        """Queue one text message, and write it at once when the socket takes the whole frame without
        waiting (a plain TCP connection, no other write in progress): True, and no checkpoint was made.
        False: the frame (or its rest) is queued; :meth:`flush` writes it, shielded as ``send_text``.
        Frames leave in the order they were queued either way. Raises ``WebsocketClosed``."""
        self._check_open()
        self._ws.send_text(text.encode())  # queued in the protocol; a flush writes it in that order
        fd = self._fd
        if fd is None or self._unsent or self._write_lock.locked():
            return False  # the write in progress takes this frame with its own (one write for both)
        data = b"".join(self._ws.data_to_send())
        try:
            written = os.write(fd, data)
        except OSError:  # full (BlockingIOError) or broken: the flush's stream write says which
            written = 0
        if written == len(data):
            return True
        self._unsent = data[written:]
        return False

    async def flush(self) -> None:
        """Write what is queued (``send_text_nowait`` returned False); shield it as ``send_text``."""
        await self._flush()

    async def ping(self) -> None:
        """Send a ping and wait for its pong (bound it with a timeout)."""
        self._check_open()
        payload = next(self._ping_ids).to_bytes(8, "big")
        pong = self._pongs[payload] = trio.Event()
        try:
            self._ws.send_ping(payload)
            await self._flush()
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
        if self._closed is not None:
            raise self._closed
        if self._early:
            data, self._early = self._early, b""
        elif self._fd is not None:
            data = await self._read_socket()
        else:
            try:
                data = bytes(await self._stream.receive_some(RECEIVE_BUFFER_BYTES))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
        if data:
            self._ws.receive_data(data)
        frames: list[Frame] = self._ws.events_received()  # type: ignore[assignment]  # open: frames only
        error = self._ws.parser_exc
        if error is not None:
            if isinstance(error, PayloadTooBig):
                raise RemoteProtocolError(
                    f"the server sent a message over {self._max_message_size * MAX_UTF8_BYTES_PER_CHARACTER:,} "
                    f"bytes; this client takes at most {self._max_message_size:,} characters "
                    "(ClientOptions.max_message_size)"
                )
            raise RemoteProtocolError(f"the server broke the websocket protocol: {error}")
        messages = await self._take(frames)
        if not data and self._closed is None:  # the TCP connection ended without a closing handshake
            await self._on_close(ABNORMAL_CLOSURE, "the connection ended")
            if not messages:
                assert self._closed is not None
                raise self._closed
        return messages

    async def _read_socket(self) -> bytes:
        """What the socket has (at most ``RECEIVE_BUFFER_BYTES``), waiting until it has something; b""
        once the connection ended, broke, or its stream was closed. One ``wait_readable`` per wait,
        instead of ``receive_some``'s checkpoints and retried read around it; after a read that did not
        fill the buffer (the socket was drained) it waits first, instead of a read that would find
        nothing (readiness is level-triggered: what came meanwhile is reported at once). The descriptor
        is read from ``_fd`` after every wait: it is None once the stream is being closed (the number
        may be another socket's by then)."""
        while True:
            if self._drained and self._fd is not None:
                self._drained = False
                self._reads_in_a_row = 0
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                except trio.ClosedResourceError:  # the stream was closed (the block of the connection ended)
                    return b""
            fd = self._fd
            if fd is None:
                return b""
            try:
                data = os.read(fd, RECEIVE_BUFFER_BYTES)
            except BlockingIOError:
                self._drained = True
                continue
            except OSError:  # reset by the peer, ...: the connection ended without a closing handshake
                return b""
            self._drained = len(data) < RECEIVE_BUFFER_BYTES
            self._reads_in_a_row += 1
            if self._reads_in_a_row >= MAX_READS_WITHOUT_YIELD:
                self._reads_in_a_row = 0
                await trio.lowlevel.checkpoint()
            return data

    async def _take(self, frames: list[Frame]) -> list[str]:
        messages: list[str] = []
        answer = False
        for frame in frames:
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.CONT:
                if opcode is Opcode.TEXT and frame.fin:
                    messages.append(self._text(frame.data))
                    continue
                self._parts.append(frame.data)
                if frame.fin:
                    messages.append(self._text(b"".join(self._parts)))
                    self._parts = []
            elif opcode is Opcode.BINARY:
                raise RemoteProtocolError("the server sent a binary frame (dspex.v1 is text frames only)")
            elif opcode is Opcode.PING:
                answer = True  # the protocol made the pong
            elif opcode is Opcode.PONG:
                waiter = self._pongs.get(bytes(frame.data))
                if waiter is not None:
                    waiter.set()
            elif opcode is Opcode.CLOSE:
                close = self._ws.close_rcvd
                code, reason = (close.code, close.reason) if close is not None else (1005, "")
                await self._on_close(code, reason)  # the protocol made the closing handshake's answer
                if messages:  # deliver what came before the close first; the next read raises
                    return messages
                assert self._closed is not None
                raise self._closed
        if answer and self._closed is None:
            try:
                await self._flush()
            except WebsocketClosed:
                if not messages:
                    raise
        return messages

    def _text(self, data: bytes | bytearray | memoryview) -> str:
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"the server sent a text message that is not UTF-8: {exc}") from None
        if len(text) > self._max_message_size:
            raise RemoteProtocolError(
                f"the server sent a message of {len(text):,} characters; this client takes at most "
                f"{self._max_message_size:,} (ClientOptions.max_message_size)"
            )
        return text

    async def _on_close(self, code: int, reason: str) -> None:
        if self._closed is None and code != ABNORMAL_CLOSURE:
            try:
                await self._flush()  # the closing handshake's answer
            except WebsocketClosed:
                pass
        self._closed = self._closed or WebsocketClosed(code, reason)
        self._close_received.set()
        for waiter in self._pongs.values():
            waiter.set()

    # -- closing -----------------------------------------------------------------------------------------
    async def aclose(self, code: int = 1000, reason: str = "", *, wait: bool = True) -> None:
        """Start the closing handshake (if still open) and, with ``wait``, wait for the server's answer,
        which the connection's reader receives; bound it with a timeout. The stream itself is closed when
        the block of :func:`open_client_websocket` ends."""
        if self._closed is None and self._ws.state is State.OPEN:
            try:
                self._ws.send_close(code, reason)
                await self._flush()
            except (WebsocketClosed, InvalidState):
                return
            if wait:  # the reader goes on reading until the answer (frames sent before it included)
                await self._close_received.wait()
            else:
                self.abort()
        elif self._closed is None:  # closing already: send what the protocol has (its 1002 after an error)
            try:
                await self._flush()
            except WebsocketClosed:
                pass
        else:
            await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Consider the connection closed now (a write outlasted its bound: the stream may hold half a
        frame); the stream is closed when the block of :func:`open_client_websocket` ends."""
        self._closed = self._closed or WebsocketClosed(ABNORMAL_CLOSURE, "aborted")
        self._close_received.set()


def _plain_socket_fd(stream: trio.abc.Stream) -> int | None:
    """The descriptor of a plain TCP stream's socket (trio's sockets are non-blocking), on POSIX only
    (``os.read`` / ``os.write`` on a socket); None for TLS and elsewhere."""
    if os.name != "posix" or not isinstance(stream, trio.SocketStream):
        return None
    fd = stream.socket.fileno()
    return fd if fd >= 0 else None


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

        def feed(data: bytes | None) -> list[Event]:
            try:
                connection.receive_data(data)
                return list(connection.events())
            except WsprotoRemoteError as exc:
                raise RemoteProtocolError(f"{url} did not answer as a websocket server: {exc}") from None

        def take(events: list[Event]) -> None:
            nonlocal accepted, refused, body
            for event in events:
                if isinstance(event, AcceptConnection):
                    accepted = event
                    return
                if isinstance(event, RejectConnection):
                    refused = event
                    if not event.has_body:
                        raise HandshakeRefused(event.status_code, "")
                elif isinstance(event, RejectData):
                    body = (body + bytes(event.data))[:MAX_REJECT_BODY_BYTES]
                    if event.body_finished:
                        assert refused is not None
                        raise HandshakeRefused(refused.status_code, body.decode("utf-8", "replace").strip())

        answer = b""  # the answer's head until its end was read: wsproto gets the head and nothing after it
        rest = b""  # what followed the head: the first frames (or a refusal's body)
        while accepted is None:
            data = bytes(await stream.receive_some(RECEIVE_BUFFER_BYTES))
            if refused is None:
                answer += data
                end = _HEAD_END.search(answer)
                if end is None and data and len(answer) <= MAX_ANSWER_HEAD_BYTES:
                    continue
                cut = len(answer) if end is None else end.end()
                head, rest, answer = answer[:cut], answer[cut:], b""
                take(feed(head))
                if refused is not None and rest:  # the body came with the head
                    take(feed(rest))
                    rest = b""
            else:
                take(feed(data))
            if not data and accepted is None:
                take(feed(None))
                if refused is not None:
                    raise HandshakeRefused(refused.status_code, body.decode("utf-8", "replace").strip())
                raise RemoteProtocolError(f"{url} closed the connection during the handshake")
        assert accepted is not None
        ws = ClientWebsocket(stream, accepted.subprotocol, max_message_size=max_message_size, early=rest)
        try:
            yield ws
        finally:
            ws._fd = None  # from now on through the stream only (closed below: its errors are the answers)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(close_timeout) as bound:
            bound.shield = True
            await stream.aclose()
