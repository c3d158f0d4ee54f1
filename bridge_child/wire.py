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
from typing import Any, Final, TypeAlias, get_args

import msgspec

__all__ = [
    "CALL_KINDS",
    "CALL_TRANSITIONS",
    "CHILD_KINDS",
    "CONNECTION_TRANSITIONS",
    "DEFAULT_MAX_FRAME_BYTES",
    "FLAG_IDEMPOTENT",
    "FLAG_STREAM",
    "HEADER",
    "HEADER_SIZE",
    "LEASE_KINDS",
    "LEASE_TRANSITIONS",
    "MAGIC",
    "MAX_PENDING_LEASES",
    "NEED_DATA",
    "PARENT_KINDS",
    "PROTOCOL_VERSION",
    "Ack",
    "Call",
    "CallState",
    "Cancel",
    "ChildMessage",
    "Connection",
    "ConnectionState",
    "Error",
    "ErrorCode",
    "Event",
    "Hello",
    "LeaseGrant",
    "LeaseRelease",
    "LeaseRequest",
    "LeaseState",
    "LocalProtocolError",
    "ParentMessage",
    "Ping",
    "Pong",
    "ProtocolError",
    "RemoteProtocolError",
    "Result",
    "Role",
    "Shutdown",
    "TracedCall",
    "UnencodableMessage",
    "decode_frames_untrusted",
    "encode_frame",
    "lm_key",
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

MAX_PENDING_LEASES: Final = 65_536
"""Most leases one connection may have requested and not yet released, a count; one more is a protocol
error (a worker asks for one lease per LM request in flight)."""

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


class TracedCall(Call, frozen=True, tag="tcall"):
    """A ``Call`` that carries the caller's trace context (OpenTelemetry, opt-in; docs/monitoring.md).

    Its own kind, so that an untraced call's frame stays byte for byte what it was; the child answers it
    as any ``Call`` (and, for ``execute``, with its spans in the result's ``trace_spans``, or in the
    error's ``details["trace_spans"]`` when it fails)."""

    trace: str = ""
    """The W3C ``traceparent`` of the caller's span: ``00-<trace id>-<span id>-<flags>``."""


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


# -- LM leases: the host's budgets for LM requests (docs/lm.md) ---------------------------------------
# A worker that leases (``--lease-lms``) asks the host before each LM request it sends; the host grants
# when that LM's pool-wide budgets allow, and the worker releases the lease when the request is over,
# saying how it went (a ``429``'s ``Retry-After`` pauses that LM for every worker). Apart from calls.


class LeaseRequest(_Message, frozen=True, tag="lease"):
    """Child -> parent: may call ``call`` send one request to the LM ``lm`` (see :func:`lm_key`)?
    Answered by exactly one ``LeaseGrant``."""

    lease: int
    """Chosen by the child; unique among its leases not yet released."""
    call: int
    """The call the request is for."""
    lm: str
    """The LM's budget key, :func:`lm_key` of its model and API base."""
    tokens: int = 0
    """Tokens the request is expected to use (an estimate, for a tokens-per-minute budget)."""


class LeaseGrant(_Message, frozen=True, tag="grant"):
    """Parent -> child: the answer to a ``LeaseRequest``: send it (``ok``), or do not (``reason``)."""

    lease: int
    ok: bool = True
    reason: str = ""
    """Why not, when not ``ok`` (the budget cannot be met before the call's deadline, the pool is
    closing, or the child released the lease before this answer)."""


class LeaseRelease(_Message, frozen=True, tag="release"):
    """Child -> parent: the leased request is over (answered, failed, or never sent); or, before the
    grant, the child no longer waits for it (its call was cancelled or ran out of time)."""

    lease: int
    status: int = 0
    """The HTTP status of the answer; 0: no answer (connect error, cancelled, never sent)."""
    retry_after: float | None = None
    """The answer's ``Retry-After``, in seconds, when it had one."""
    tokens: int = 0
    """Tokens the request used, as the answer reported them (0: unknown)."""
    sent_ago: float | None = None
    """Seconds since the request was sent (its last byte written); None: it was never sent. The host
    counts the request against the LM's rate from then, not from its grant: a worker may be slow to
    send what it was granted."""


def lm_key(model: str, api_base: str | None = None) -> str:
    """The key of an LM's budgets: its model and API base (the same model at two bases is two LMs)."""
    return f"{model} @ {api_base.rstrip('/')}" if api_base else model


ParentMessage: TypeAlias = Call | TracedCall | Cancel | Ping | Shutdown | LeaseGrant
"""What the parent sends and the child receives."""
ChildMessage: TypeAlias = Hello | Ack | Event | Result | Error | Pong | LeaseRequest | LeaseRelease
"""What the child sends and the parent receives."""
Message: TypeAlias = ParentMessage | ChildMessage


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""``next_event()`` returns this when the buffer holds no complete frame."""


# -- the conversation's rules: two tables, role-neutral --------------------------------------------
# Both ends apply the same rules to every frame, to what they send and to what they receive alike
# (``Connection._apply``); only the error differs: ``LocalProtocolError`` for a frame we send,
# ``RemoteProtocolError`` for one we received. Who sends which kind is ``ParentMessage`` /
# ``ChildMessage``: each side decodes only the other's kinds and sends only its own.

PARENT_KINDS: Final[tuple[type, ...]] = get_args(ParentMessage)
"""The kinds the parent sends (and the child receives)."""
CHILD_KINDS: Final[tuple[type, ...]] = get_args(ChildMessage)
"""The kinds the child sends (and the parent receives)."""
CALL_KINDS: Final = frozenset({Call, TracedCall, Ack, Event, Result, Error})
"""The kinds that belong to one call (by ``id``) and move it through ``CALL_TRANSITIONS``."""
LEASE_KINDS: Final = frozenset({LeaseRequest, LeaseGrant, LeaseRelease})
"""The kinds that belong to one lease (by ``lease``) and move it through ``LEASE_TRANSITIONS``."""


class ConnectionState(enum.StrEnum):
    AWAITING_HELLO = "awaiting hello"
    """The child has not sent its hello yet: only the parent's frames may flow."""
    OPEN = "open"
    """The hello was sent: every kind may flow, but no second hello."""


CONNECTION_TRANSITIONS: Final[dict[tuple[ConnectionState, type], ConnectionState]] = {
    (ConnectionState.AWAITING_HELLO, Hello): ConnectionState.OPEN,
    # The parent need not wait for the hello: it may send calls (and pings, ...) at once.
    (ConnectionState.AWAITING_HELLO, Call): ConnectionState.AWAITING_HELLO,
    (ConnectionState.AWAITING_HELLO, TracedCall): ConnectionState.AWAITING_HELLO,
    (ConnectionState.AWAITING_HELLO, Cancel): ConnectionState.AWAITING_HELLO,
    (ConnectionState.AWAITING_HELLO, Ping): ConnectionState.AWAITING_HELLO,
    (ConnectionState.AWAITING_HELLO, Shutdown): ConnectionState.AWAITING_HELLO,
    (ConnectionState.OPEN, Call): ConnectionState.OPEN,
    (ConnectionState.OPEN, TracedCall): ConnectionState.OPEN,
    (ConnectionState.OPEN, Cancel): ConnectionState.OPEN,
    (ConnectionState.OPEN, Ping): ConnectionState.OPEN,
    (ConnectionState.OPEN, Shutdown): ConnectionState.OPEN,
    (ConnectionState.OPEN, Ack): ConnectionState.OPEN,
    (ConnectionState.OPEN, Event): ConnectionState.OPEN,
    (ConnectionState.OPEN, Result): ConnectionState.OPEN,
    (ConnectionState.OPEN, Error): ConnectionState.OPEN,
    (ConnectionState.OPEN, Pong): ConnectionState.OPEN,
    (ConnectionState.OPEN, LeaseRequest): ConnectionState.OPEN,
    (ConnectionState.OPEN, LeaseGrant): ConnectionState.OPEN,
    (ConnectionState.OPEN, LeaseRelease): ConnectionState.OPEN,
}
"""(connection state, frame kind) -> next state: the hello comes first, and once (leases come after
it: the child asks for them). Anything else is a protocol violation."""


class CallState(enum.StrEnum):
    AWAITING_ACK = "awaiting ack"
    """Sent; neither acked nor rejected yet."""
    RUNNING = "running"
    """Acked: events may come, then exactly one terminal frame."""
    DONE = "done"
    """Finished (or never sent): the id is free for a new call."""


CALL_TRANSITIONS: Final[dict[tuple[CallState, type], CallState]] = {
    (CallState.DONE, Call): CallState.AWAITING_ACK,
    (CallState.DONE, TracedCall): CallState.AWAITING_ACK,
    (CallState.AWAITING_ACK, Ack): CallState.RUNNING,
    (CallState.AWAITING_ACK, Error): CallState.DONE,  # rejected before any work
    (CallState.RUNNING, Event): CallState.RUNNING,  # with the next seq: 0, 1, 2, ...
    (CallState.RUNNING, Result): CallState.DONE,
    (CallState.RUNNING, Error): CallState.DONE,
}
"""(call state, frame kind) -> next state, for the frames in ``CALL_KINDS``. Anything else is a protocol
violation. ``cancel``, ``ping``, ``pong`` and ``shutdown`` are outside any call: a ``cancel`` may name an
id that already finished (it crossed the reply)."""


class LeaseState(enum.StrEnum):
    FREE = "free"
    """Never requested, or released and answered: the lease id may be used again."""
    REQUESTED = "requested"
    """Asked for; no answer yet."""
    GRANTED = "granted"
    """Granted (or refused: the child then releases it at once); the request may be sent."""
    ABANDONED = "abandoned"
    """Released before its answer (the child stopped waiting): the answer still comes, once, and the
    child drops it (counted in ``late_frames``)."""


LEASE_TRANSITIONS: Final[dict[tuple[LeaseState, type], LeaseState]] = {
    (LeaseState.FREE, LeaseRequest): LeaseState.REQUESTED,
    (LeaseState.REQUESTED, LeaseGrant): LeaseState.GRANTED,
    (LeaseState.REQUESTED, LeaseRelease): LeaseState.ABANDONED,
    (LeaseState.GRANTED, LeaseRelease): LeaseState.FREE,
    (LeaseState.ABANDONED, LeaseGrant): LeaseState.FREE,
}
"""(lease state, frame kind) -> next state, for the frames in ``LEASE_KINDS``: every request gets
exactly one answer, and every lease is released once. Anything else is a protocol violation."""


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
_SENDS: Final[dict[Role, frozenset[type]]] = {
    Role.PARENT: frozenset(PARENT_KINDS),
    Role.CHILD: frozenset(CHILD_KINDS),
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

    Both ends track the conversation through the same two tables, ``CONNECTION_TRANSITIONS`` (the hello
    first, once) and ``CALL_TRANSITIONS`` (every call by id), applied alike to what they send and what
    they receive. A call the parent *abandoned* (``abandon(id)``: timeout or cancellation) stays tracked
    until its terminal frame: frames for it are checked like any other, then dropped and counted in
    ``late_frames``: ``next_event()`` never returns them, so a late reply cannot reach a caller. A frame
    for an id that is not pending (never sent, or finished) is a protocol error.
    """

    def __init__(
        self, role: Role, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, check_states: bool = True
    ) -> None:
        self.role = role
        self.max_frame_bytes = max_frame_bytes
        self._check_states = check_states
        self._decoder = _DECODERS[role]
        self._sends = _SENDS[role]
        self._buffer = bytearray()
        self._offset = 0
        self._eof = False
        self._broken: ProtocolError | None = None
        self._state = ConnectionState.AWAITING_HELLO
        self._calls: dict[int, CallState] = {}
        """Pending calls (not ``DONE``), by id."""
        self._next_seq: dict[int, int] = {}
        self._abandoned: set[int] = set()
        self._leases: dict[int, LeaseState] = {}
        """Leases not ``FREE``, by id."""
        self.late_frames = 0
        """Frames received for abandoned calls, and answers to abandoned leases, dropped (a late reply
        never reaches a caller)."""
        self.hello: Hello | None = None
        """The worker's hello (received by the parent, sent by the child), once it went by."""

    # -- inspection ---------------------------------------------------------------------------------
    @property
    def state(self) -> ConnectionState:
        """Whether the child's hello went by (``CONNECTION_TRANSITIONS``)."""
        return self._state

    def call_state(self, call_id: int) -> CallState:
        """The state of a call; DONE for ids that are finished or unknown."""
        return self._calls.get(call_id, CallState.DONE)

    @property
    def pending_calls(self) -> int:
        return len(self._calls)

    def lease_state(self, lease: int) -> LeaseState:
        """The state of a lease; FREE for ids that are released or unknown."""
        return self._leases.get(lease, LeaseState.FREE)

    @property
    def pending_leases(self) -> int:
        """Leases requested and not yet both released and answered."""
        return len(self._leases)

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
        """Apply a received message (the decoder let through only the peer's kinds); False if it is a
        late frame of an abandoned call, or the answer to an abandoned lease, to drop."""
        if type(message) in LEASE_KINDS:
            previous = self.lease_state(message.lease)  # type: ignore[union-attr]
            self._apply(message, RemoteProtocolError)
            if type(message) is LeaseGrant and previous is LeaseState.ABANDONED:
                self.late_frames += 1  # the child stopped waiting for it
                return False
            return True
        call_state = self._apply(message, RemoteProtocolError)
        if call_state is None or not self._abandoned:
            return True
        call_id: int = message.id  # type: ignore[union-attr]
        if call_id not in self._abandoned:
            return True
        if call_state is CallState.DONE:
            self._abandoned.discard(call_id)
        self.late_frames += 1
        return False

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
            if type(message) not in self._sends:
                raise LocalProtocolError(f"the {self.role.value} cannot send {type(message).__name__}")
            self._apply(message, LocalProtocolError)
        return frame

    # -- the rules, for both directions -------------------------------------------------------------
    def _apply(self, message: Message, error: type[ProtocolError]) -> CallState | None:
        """Apply one frame, sent or received, to the conversation: the connection's table, then the
        call's table and the order of its events. Returns the call's new state for a frame in
        ``CALL_KINDS``, else None.

        Raises:
            error: the frame breaks a rule; nothing is changed.
        """
        kind = type(message)
        state = self._state
        next_state = CONNECTION_TRANSITIONS.get((state, kind))
        if next_state is None:
            if state is ConnectionState.AWAITING_HELLO:
                raise error(f"the child's first frame must be hello, not {kind.__name__}")
            raise error(f"a second {kind.__name__.lower()}")
        if kind in LEASE_KINDS:
            self._apply_lease(message, error)  # type: ignore[arg-type]
            return None
        if kind not in CALL_KINDS:
            # Only the hello changes the connection's state (the table maps every other kind to the
            # state it found). Not writing it for the others matters in the child, whose reader thread
            # applies received frames while its hello may be sent.
            if kind is Hello:
                if message.version != PROTOCOL_VERSION:  # type: ignore[union-attr]
                    raise error(f"worker speaks protocol {message.version}, not {PROTOCOL_VERSION}")  # type: ignore[union-attr]
                self.hello = message  # type: ignore[assignment]
                self._state = next_state
            return None
        call_id: int = message.id  # type: ignore[union-attr]
        call_state = self._calls.get(call_id, CallState.DONE)
        next_call_state = CALL_TRANSITIONS.get((call_state, kind))
        if next_call_state is None:
            if kind is Call or kind is TracedCall:
                raise error(f"call id {call_id} is already pending")
            if call_state is CallState.DONE:
                raise error(
                    f"{kind.__name__} for call {call_id}, which is not pending (never sent, or finished)"
                )
            raise error(f"{kind.__name__} for call {call_id} in state {call_state.value}")
        if kind is Event:
            expected = self._next_seq.get(call_id, 0)
            if message.seq != expected:  # type: ignore[union-attr]
                raise error(f"event seq {message.seq} for call {call_id}, expected {expected}")  # type: ignore[union-attr]
            self._next_seq[call_id] = expected + 1
        if next_call_state is CallState.DONE:
            del self._calls[call_id]
            self._next_seq.pop(call_id, None)
        else:
            self._calls[call_id] = next_call_state
        return next_call_state

    def _apply_lease(
        self, message: LeaseRequest | LeaseGrant | LeaseRelease, error: type[ProtocolError]
    ) -> LeaseState:
        """Apply one lease frame (already past the connection's table) to ``LEASE_TRANSITIONS``; the
        lease's new state.

        Raises:
            error: the frame breaks a rule; nothing is changed.
        """
        kind = type(message)
        lease = message.lease
        state = self._leases.get(lease, LeaseState.FREE)
        next_state = LEASE_TRANSITIONS.get((state, kind))
        if next_state is None:
            raise error(f"{kind.__name__} for lease {lease} in state {state.value}")
        if kind is LeaseRequest and len(self._leases) >= MAX_PENDING_LEASES:
            raise error(f"more than {MAX_PENDING_LEASES} leases pending")
        if next_state is LeaseState.FREE:
            del self._leases[lease]
        else:
            self._leases[lease] = next_state
        return next_state

    # -- the parent's bookkeeping -------------------------------------------------------------------
    def abandon(self, call_id: int) -> bool:
        """Parent side: the caller gave up on ``call_id``; its later frames are dropped and counted.

        Returns True if the call was still pending (a ``Cancel`` is then worth sending).
        """
        if call_id in self._calls:
            self._abandoned.add(call_id)
            return True
        return False

    def forget_all(self) -> list[int]:
        """Drop every pending call and lease (the peer is gone); returns the calls' ids."""
        ids = list(self._calls)
        self._leases.clear()
        self._calls.clear()
        self._next_seq.clear()
        self._abandoned.clear()
        return ids
