"""The endpoint's read path: a client's whole, masked, unfragmented text frames parsed here, the rest by
wsproto.

trio-websocket reads every byte through wsproto, whose pure-Python frame parser (and unmasking) is the
largest cost per message of the read path. :class:`FastReadStream` wraps a connection's stream (the one
trio-websocket's reader task reads; trio-websocket still owns the connection, its handshake, its close and
its pings): at a point where wsproto holds no partial frame and no fragmented message, it takes over
parsing. Each frame at the front of what it read is then

- a **simple text message** (FIN, no RSV bit, opcode text, masked, payload within ``max_message_size``,
  its length in the shortest form, valid UTF-8): unmasked (``websockets``' C ``apply_mask``), decoded,
  and put in trio-websocket's message channel, where ``get_message`` finds it as before (same
  backpressure: the reader waits when the channel is full);
- a **ping or a pong** (whole): handed to wsproto as it came, alone; wsproto answers or records it, and
  its state is clean again after it;
- **anything else** (a fragment, a continuation, a binary or close frame, an unmasked frame, RSV bits, an
  oversized or non-minimal length, invalid UTF-8, an unknown opcode): the fast path ends for good, and
  that frame and every byte after it go to wsproto as they came, which accepts or refuses them exactly as
  without this module (close codes 1002, 1007, 1009 ...).

What it holds is bounded: one frame's bytes, at most ``max_message_size`` plus a 14-byte header, and one
read (``READ_BYTES``). Plain TCP and TLS alike (it sits above the stream).
"""

from __future__ import annotations

from typing import Any, Final

import trio
from wsproto.connection import ConnectionState

from dspex_trio._util import WrappedStream

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

__all__ = ["READ_BYTES", "FastReadStream", "wsproto_idle"]

READ_BYTES: Final = 65536
"""Bytes asked of the socket per read on the fast path."""
_TEXT: Final = 0x1
_PING: Final = 0x9
_PONG: Final = 0xA


def wsproto_idle(ws: Any) -> bool:
    """Whether trio-websocket's wsproto connection holds no byte, frame or message in progress (its open
    connection's frame decoder empty, no fragmented message begun): the point where parsing may move."""
    connection = getattr(getattr(ws, "_wsproto", None), "connection", None)
    proto = getattr(connection, "_proto", None)
    frames = getattr(proto, "_frame_decoder", None)
    messages = getattr(proto, "_message_decoder", None)
    buffer = getattr(frames, "buffer", None)
    if buffer is None or messages is None or getattr(connection, "_events", True):
        return False
    return (
        getattr(ws._wsproto, "state", None) is ConnectionState.OPEN
        and not getattr(proto, "extensions", True)
        and len(buffer) == 0
        and getattr(frames, "header", True) is None
        and getattr(messages, "opcode", True) is None
    )


class FastReadStream(WrappedStream):
    """The stream trio-websocket reads, parsing simple text frames itself (see the module)."""

    def __init__(self, stream: trio.abc.Stream, ws: Any, max_message_size: int) -> None:
        super().__init__(stream)
        self._ws = ws
        self._max = max_message_size
        self._state = "waiting"
        """``waiting`` (for a point where wsproto is idle), ``fast``, or ``raw`` (for good)."""
        self._buffer = bytearray()
        self._out = bytearray()
        """Bytes for wsproto, in order (whole control frames; everything once raw)."""
        self.fast_messages = 0
        """Messages parsed here (the tests read it)."""

    def __repr__(self) -> str:
        return repr(self._stream)

    def _give(self, size: int | None) -> bytes:
        n = len(self._out) if size is None else min(size, len(self._out))
        out = bytes(self._out[:n])
        del self._out[:n]
        return out

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The next bytes for wsproto; simple text messages read meanwhile go to the message channel."""
        while True:
            if self._out:
                return self._give(max_bytes)
            if self._state == "raw":
                return await self._stream.receive_some(max_bytes)
            if self._state == "waiting":
                if not wsproto_idle(self._ws):
                    return await self._stream.receive_some(max_bytes)
                self._state = "fast"
            if self._buffer:
                await self._parse()  # what was read already, after a control frame handed over
                if self._out or self._state == "raw":
                    continue
            data = await self._stream.receive_some(READ_BYTES)
            if not data:  # end of stream: what is left (a partial frame) is wsproto's to judge
                self._raw()
                if self._out:
                    return self._give(max_bytes)
                return b""
            self._buffer += data
            await self._parse()

    def _raw(self) -> None:
        """The fast path ends: every byte from here goes to wsproto."""
        self._state = "raw"
        self._out += self._buffer
        self._buffer = bytearray()

    async def _parse(self) -> None:
        """Deliver the whole simple text frames at the front of the buffer, in order; stop at the first
        partial frame (more bytes needed), a control frame (handed to wsproto) or anything else (raw)."""
        buffer = self._buffer
        while len(buffer) >= 2:
            if self._ws._wsproto.state is not ConnectionState.OPEN:
                self._raw()
                return
            first, second = buffer[0], buffer[1]
            length = second & 0x7F
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length = int.from_bytes(buffer[2:4], "big")
                offset = 4
                minimal = length > 125
            elif length == 127:
                if len(buffer) < 10:
                    return
                length = int.from_bytes(buffer[2:10], "big")
                offset = 10
                minimal = 0xFFFF < length < 1 << 63
            else:
                minimal = True
            simple = first == 0x80 | _TEXT
            control = first in (0x80 | _PING, 0x80 | _PONG) and length <= 125
            if not (second & 0x80) or not minimal or not (simple or control) or length > self._max:
                self._raw()  # unmasked, non-minimal, fragmented, binary, close, RSV, oversized ...
                return
            end = offset + 4 + length
            if len(buffer) < end:
                return  # the rest of the frame is still to come
            if control:
                self._out += buffer[:end]
                del buffer[:end]
                return  # wsproto takes it alone, and is idle again after it
            payload = apply_mask(bytes(buffer[offset + 4 : end]), bytes(buffer[offset : offset + 4]))
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                self._raw()  # wsproto closes with 1007
                return
            del buffer[:end]
            self.fast_messages += 1
            try:
                await self._ws._send_channel.send(text)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the connection is closing: trio-websocket drops messages then too
