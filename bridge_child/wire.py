"""The dspex-trio wire protocol, sans-IO: bytes in, messages out.

Pure: no trio, no dspy, no I/O. Both ends (the Trio runtime and the ``bridge_child`` worker) drive a
:class:`Connection` with ``receive_data(bytes)`` / ``next_event()`` and ``send(message) -> bytes``, in the
manner of h11 and wsproto. The byte layout, the messages and their semantics are specified in
``docs/protocol.md``.

Frame layout (big-endian)::

    +-------+---------+----------------+------------------------------+
    | magic | version | body length    | body: one msgpack message    |
    | 0xD5  | 1 byte  | uint32, bytes  | (``length`` bytes)           |
    +-------+---------+----------------+------------------------------+

Every message is a msgspec ``Struct`` encoded as a msgpack array whose first element is the message
kind. Each direction decodes only the kinds it may receive, so a message of the wrong kind or shape is a
:class:`RemoteProtocolError`, like any other malformed input.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Final, TypeAlias

import msgspec

__all__ = [
    "CALL_TRANSITIONS",
    "DEFAULT_MAX_FRAME_BYTES",
    "FLAG_IDEMPOTENT",
    "FLAG_STREAM",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Ack",
    "Call",
    "CallState",
    "Cancel",
    "ChildMessage",
    "Connection",
    "Error",
    "ErrorCode",
    "Event",
    "Hello",
    "LocalProtocolError",
    "ParentMessage",
    "Ping",
    "Pong",
    "ProtocolError",
    "RemoteProtocolError",
    "Result",
    "Role",
    "Shutdown",
    "UnencodableMessage",
    "decode_frames_untrusted",
    "encode_frame",
]

MAGIC: Final = 0xD5
"""First byte of every frame; a desynchronised stream fails on the next frame instead of misparsing."""
PROTOCOL_VERSION: Final = 1
"""Second byte of every frame and ``Hello.version``. Bumped on any incompatible change."""
HEADER: Final = struct.Struct(">BBI")
"""magic (uint8), version (uint8), body length in bytes (uint32)."""
HEADER_SIZE: Final = HEADER.size
DEFAULT_MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
"""Largest accepted body, in bytes; checked on the header, before any of the body is buffered."""
_COMPACT_AFTER_BYTES: Final = 64 * 1024
"""Consumed bytes at the front of the receive buffer are dropped once they exceed this, in bytes."""

FLAG_IDEMPOTENT: Final = 1
"""Call flag: the call may safely run twice (the runtime may retry it on another worker)."""
FLAG_STREAM: Final = 2
"""Call flag: the caller wants ``Event`` frames (stream chunks) before the terminal frame."""


class ProtocolError(Exception):
    """Base of every protocol violation raised by this module."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid: bad header, oversized, undecodable, unknown kind, wrong state."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow in the current state."""


class UnencodableMessage(LocalProtocolError):
    """A message (its params or its value) cannot be encoded: not plain msgpack-able data."""


class ErrorCode(enum.StrEnum):
    """The stable set of ``Error.code`` values."""

    UNKNOWN_METHOD = "unknown_method"
    """Rejected before the ack: the worker has no such method."""
    INVALID_PARAMS = "invalid_params"
    """The method refused its params."""
    CANCELLED = "cancelled"
    """The call was cancelled by a ``Cancel`` frame."""
    TIMEOUT = "timeout"
    """The call's deadline passed in the worker."""
    SHUTTING_DOWN = "shutting_down"
    """Rejected before the ack: the worker is draining after a ``Shutdown`` frame."""
    UNENCODABLE = "unencodable"
    """The result could not be encoded."""
    PROGRAM_NOT_FOUND = "program_not_found"
    """The program named by the call does not exist (in the worker's cache nor in the call)."""
    CACHE_MISS = "cache_miss"
    """The call named a program by (id, version) without its spec, and the worker does not hold it."""
    PROGRAM_ERROR = "program_error"
    """The program itself failed (LM errors included); ``type`` names the original exception type."""
    INTERNAL = "internal"
    """An unexpected exception in the worker; ``type`` names it."""


# -- messages ---------------------------------------------------------------------------------------
# array_like: encoded as [kind, field, field, ...], the kind tag first.


class _Message(msgspec.Struct, frozen=True, array_like=True, tag_field="kind"):
    """Base of every message; not sent itself."""


class Hello(_Message, frozen=True, tag="hello"):
    """Child -> parent, the first frame: who the worker is and what it can do."""

    version: int
    pid: int
    capacity: int
    """How many calls the worker runs at once; more are acked and queued in the worker."""
    capabilities: list[str] = []
    """The methods this worker serves."""
    versions: dict[str, str] = {}
    """Library versions (python, bridge_child, msgspec, and dspy once imported)."""


class Call(_Message, frozen=True, tag="call"):
    """Parent -> child: run ``method(params)``. Answered by ``Ack`` (or a rejecting ``Error``) first."""

    id: int
    method: str
    params: Any = None
    timeout: float | None = None
    """Seconds left before the caller's deadline when the frame was sent; None for no deadline."""
    flags: int = 0
    """Bit set of ``FLAG_*``."""


class Ack(_Message, frozen=True, tag="ack"):
    """Child -> parent: the call was received and accepted; exactly one terminal frame will follow."""

    id: int


class Event(_Message, frozen=True, tag="event"):
    """Child -> parent: a stream chunk or progress for an acked call; ``seq`` counts 0, 1, 2, ..."""

    id: int
    seq: int
    data: Any = None


class Result(_Message, frozen=True, tag="result"):
    """Child -> parent, terminal: the call succeeded with ``value``."""

    id: int
    value: Any = None


class Error(_Message, frozen=True, tag="error"):
    """Child -> parent, terminal: the call failed, or was rejected (when it comes before an ``Ack``)."""

    id: int
    code: str
    type: str = ""
    """The original exception type's name, e.g. ``LMRateLimitError``."""
    message: str = ""
    details: Any = None


class Cancel(_Message, frozen=True, tag="cancel"):
    """Parent -> child: stop call ``id``; the child answers with its terminal frame (if not yet sent)."""

    id: int


class Ping(_Message, frozen=True, tag="ping"):
    """Parent -> child heartbeat; answered by ``Pong`` with the same nonce, even while calls run."""

    nonce: int


class Pong(_Message, frozen=True, tag="pong"):
    """Child -> parent heartbeat answer."""

    nonce: int


class Shutdown(_Message, frozen=True, tag="shutdown"):
    """Parent -> child: refuse new calls, let running ones finish for up to ``grace`` seconds, exit 0."""

    grace: float


ParentMessage: TypeAlias = Call | Cancel | Ping | Shutdown
"""What the parent sends and the child receives."""
ChildMessage: TypeAlias = Hello | Ack | Event | Result | Error | Pong
"""What the child sends and the parent receives."""
Message: TypeAlias = ParentMessage | ChildMessage


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""``next_event()`` returns this when the buffer holds no complete frame."""


# -- the per-call state table (the only place call states change) -----------------------------------


class CallState(enum.Enum):
    AWAITING_ACK = "awaiting ack"
    RUNNING = "running"
    DONE = "done"


CALL_TRANSITIONS: Final[dict[tuple[CallState, type], CallState]] = {
    (CallState.AWAITING_ACK, Ack): CallState.RUNNING,
    (CallState.AWAITING_ACK, Error): CallState.DONE,  # rejected before any work
    (CallState.RUNNING, Event): CallState.RUNNING,
    (CallState.RUNNING, Result): CallState.DONE,
    (CallState.RUNNING, Error): CallState.DONE,
}
"""(state, child frame kind) -> next state. Anything else is a protocol violation."""


class Role(enum.Enum):
    PARENT = "parent"
    """The runtime: sends ``ParentMessage``, receives ``ChildMessage``; expects ``Hello`` first."""
    CHILD = "child"
    """The worker: sends ``ChildMessage`` (``Hello`` first), receives ``ParentMessage``."""


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODERS: Final[dict[Role, msgspec.msgpack.Decoder[Any]]] = {
    Role.PARENT: msgspec.msgpack.Decoder(ChildMessage),
    Role.CHILD: msgspec.msgpack.Decoder(ParentMessage),
}


def encode_frame(message: Message) -> bytes:
    """Encode one message as one frame (header + body), without any state checks.

    Raises:
        UnencodableMessage: the message holds something msgpack cannot carry.
    """
    try:
        body = _ENCODER.encode(message)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # RecursionError: cyclic/too deep
        raise UnencodableMessage(f"cannot encode {type(message).__name__}: {exc}") from exc
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, len(body)) + body


def _check_header_untrusted(buffer: bytes | bytearray | memoryview, offset: int, max_frame_bytes: int) -> int:
    magic, version, length = HEADER.unpack_from(buffer, offset)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad frame magic 0x{magic:02x} (stream desynchronised?)")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {version} (expected {PROTOCOL_VERSION})")
    if length > max_frame_bytes:
        raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {max_frame_bytes} bytes")
    return int(length)


def decode_frames_untrusted(
    data: bytes, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> list[Message]:
    """Decode a complete byte string of frames, as ``role`` would receive them (stateless; for tools).

    Raises:
        RemoteProtocolError: on any malformed input, including a truncated last frame.
    """
    conn = Connection(role, max_frame_bytes=max_frame_bytes, check_states=False)
    conn.receive_data(data)
    out: list[Message] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)  # type: ignore[arg-type]
    conn.receive_data(b"")
    if conn.next_event() is not NEED_DATA:  # pragma: no cover - EOF path raises
        raise AssertionError("unreachable")
    return out


class Connection:
    """One end of a worker connection: frames, kinds, ordering and per-call states.

    ``receive_data(b"")`` signals EOF; a partial frame at EOF is a ``RemoteProtocolError``.
    ``next_event()`` returns the next received message or ``NEED_DATA``; it raises
    ``RemoteProtocolError`` for anything malformed, after which the connection is unusable.
    ``send(message)`` validates the message against our own state and returns the bytes to write.

    The parent's side tracks every call through ``CALL_TRANSITIONS``. A call the parent *abandoned*
    (``abandon(id)``: timeout or cancellation) stays tracked until its terminal frame; frames for it are
    checked like any other, then dropped and counted in ``late_frames``: ``next_event()`` never returns
    them, so a late reply cannot reach a caller. A frame for an id the parent never sent is a protocol
    error.
    """

    def __init__(
        self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, check_states: bool = True
    ) -> None:
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        self._check_states = check_states
        self._decoder = _DECODERS[role]
        self._buffer = bytearray()
        self._offset = 0
        self._eof = False
        self._broken: ProtocolError | None = None
        self._hello_seen = role is Role.CHILD  # the child receives no hello
        self._hello_sent = role is Role.PARENT
        self._calls: dict[int, CallState] = {}
        self._next_seq: dict[int, int] = {}
        self._abandoned: set[int] = set()
        self.late_frames = 0
        """Frames received for abandoned calls, dropped (a late reply never reaches a caller)."""
        self.hello: Hello | None = None

    # -- inspection ---------------------------------------------------------------------------------
    def call_state(self, call_id: int) -> CallState:
        """The state of a call; DONE for ids that are finished or unknown."""
        return self._calls.get(call_id, CallState.DONE)

    @property
    def pending_calls(self) -> int:
        return len(self._calls)

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._offset

    # -- receiving ----------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means EOF.

        Raises:
            RemoteProtocolError: at once, if a complete header announces an oversized or bad frame, so an
                oversized body is never buffered.
        """
        if self._broken is not None:
            raise self._broken
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after EOF")
        self._buffer += data
        if self.buffered_bytes >= HEADER_SIZE:
            try:
                _check_header_untrusted(self._buffer, self._offset, self.max_frame_bytes)
            except RemoteProtocolError as exc:
                self._broken = exc
                raise

    def next_event(self) -> Message | _NeedData:
        """The next complete, valid message, or ``NEED_DATA``. Raises ``RemoteProtocolError``."""
        if self._broken is not None:
            raise self._broken
        try:
            while True:
                message = self._next_frame()
                if message is NEED_DATA:
                    return NEED_DATA
                if self._check_states and not self._accept(message):  # type: ignore[arg-type]
                    continue  # a late frame for an abandoned call: dropped and counted
                return message
        except RemoteProtocolError as exc:
            self._broken = exc
            raise

    def _next_frame(self) -> Message | _NeedData:
        available = len(self._buffer) - self._offset
        if available < HEADER_SIZE:
            if self._eof and available:
                raise RemoteProtocolError(f"EOF inside a frame header ({available} bytes)")
            return NEED_DATA
        length = _check_header_untrusted(self._buffer, self._offset, self.max_frame_bytes)
        end = self._offset + HEADER_SIZE + length
        if len(self._buffer) < end:
            if self._eof:
                raise RemoteProtocolError(f"EOF inside a frame body ({available} of {HEADER_SIZE + length})")
            return NEED_DATA
        body = memoryview(self._buffer)[self._offset + HEADER_SIZE : end]
        try:
            message: Message = self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # too deeply nested
            raise RemoteProtocolError(f"undecodable frame body: {exc}") from exc
        finally:
            body.release()
        self._offset = end
        if self._offset >= _COMPACT_AFTER_BYTES or self._offset == len(self._buffer):
            del self._buffer[: self._offset]
            self._offset = 0
        return message

    def _accept(self, message: Message) -> bool:
        """Apply a received message to the state; False if it is a late frame to drop."""
        if self.role is Role.CHILD:
            if isinstance(message, Call):
                if message.id in self._calls:
                    raise RemoteProtocolError(f"call id {message.id} is already pending")
                self._calls[message.id] = CallState.AWAITING_ACK
            return True
        # parent side
        if not self._hello_seen:
            if not isinstance(message, Hello):
                raise RemoteProtocolError(f"expected hello first, got {type(message).__name__}")
            if message.version != PROTOCOL_VERSION:
                raise RemoteProtocolError(f"worker speaks protocol {message.version}, not {PROTOCOL_VERSION}")
            self._hello_seen = True
            self.hello = message
            return True
        if isinstance(message, Hello):
            raise RemoteProtocolError("second hello")
        if isinstance(message, Pong):
            return True
        call_id = message.id  # type: ignore[union-attr]
        state = self._calls.get(call_id)
        if state is None:
            raise RemoteProtocolError(f"{type(message).__name__} for call {call_id}, which was never sent")
        next_state = CALL_TRANSITIONS.get((state, type(message)))
        if next_state is None:
            raise RemoteProtocolError(f"{type(message).__name__} for call {call_id} in state {state.value}")
        if isinstance(message, Event):
            expected = self._next_seq.get(call_id, 0)
            if message.seq != expected:
                raise RemoteProtocolError(f"event seq {message.seq} for call {call_id}, expected {expected}")
            self._next_seq[call_id] = expected + 1
        if next_state is CallState.DONE:
            del self._calls[call_id]
            self._next_seq.pop(call_id, None)
        else:
            self._calls[call_id] = next_state
        if call_id in self._abandoned:
            if next_state is CallState.DONE:
                self._abandoned.discard(call_id)
            self.late_frames += 1
            return False
        return True

    # -- sending ------------------------------------------------------------------------------------
    def send(self, message: Message) -> bytes:
        """Validate ``message`` against our state and return its frame.

        Raises:
            LocalProtocolError: the message is not allowed now (state is unchanged).
            UnencodableMessage: the message cannot be encoded (state is unchanged).
        """
        frame = encode_frame(message)
        if len(frame) - HEADER_SIZE > self.max_frame_bytes:
            raise UnencodableMessage(
                f"{type(message).__name__} of {len(frame) - HEADER_SIZE} bytes exceeds the frame limit of "
                f"{self.max_frame_bytes} bytes"
            )
        if self._check_states:
            self._apply_send(message)
        return frame

    def _apply_send(self, message: Message) -> None:
        if self.role is Role.PARENT:
            if isinstance(message, Call):
                if message.id in self._calls:
                    raise LocalProtocolError(f"call id {message.id} is still pending")
                self._calls[message.id] = CallState.AWAITING_ACK
            elif not isinstance(message, Cancel | Ping | Shutdown):
                raise LocalProtocolError(f"the parent cannot send {type(message).__name__}")
            return
        # child side
        if not self._hello_sent:
            if not isinstance(message, Hello):
                raise LocalProtocolError(f"the first frame must be hello, not {type(message).__name__}")
            self._hello_sent = True
            return
        if isinstance(message, Hello):
            raise LocalProtocolError("hello was already sent")
        if isinstance(message, Pong):
            return
        if not isinstance(message, Ack | Event | Result | Error):
            raise LocalProtocolError(f"the child cannot send {type(message).__name__}")
        state = self._calls.get(message.id)
        if state is None:
            raise LocalProtocolError(f"{type(message).__name__} for call {message.id}, which is not pending")
        next_state = CALL_TRANSITIONS.get((state, type(message)))
        if next_state is None:
            raise LocalProtocolError(f"{type(message).__name__} for call {message.id} in state {state.value}")
        if next_state is CallState.DONE:
            del self._calls[message.id]
        else:
            self._calls[message.id] = next_state

    def abandon(self, call_id: int) -> bool:
        """Parent side: the caller gave up on ``call_id``; its later frames are dropped and counted.

        Returns True if the call was still pending (a ``Cancel`` is then worth sending).
        """
        if call_id in self._calls:
            self._abandoned.add(call_id)
            return True
        return False

    def forget_all(self) -> list[int]:
        """Drop every pending call (the peer is gone); returns their ids."""
        ids = list(self._calls)
        self._calls.clear()
        self._next_seq.clear()
        self._abandoned.clear()
        return ids
