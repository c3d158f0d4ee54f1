"""Tests of the sans-IO wire protocol (``bridge_child.wire``), in the manner of h11 and wsproto.

Plain synchronous tests: bytes in, messages out, no I/O. ``ConnectionPair`` joins a parent and a child
``Connection`` by a fake link; the fuzz tests hold the invariant that any input either parses or raises
an exception of the ``ProtocolError`` family, never anything else.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge_child import wire
from bridge_child.wire import (
    CALL_TRANSITIONS,
    CONNECTION_TRANSITIONS,
    DEFAULT_MAX_FRAME_BYTES,
    FLAG_IDEMPOTENT,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Call,
    CallState,
    Cancel,
    Connection,
    ConnectionState,
    Error,
    ErrorCode,
    Event,
    Hello,
    LeaseGrant,
    LeaseRelease,
    LeaseRequest,
    LeaseState,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    Result,
    Role,
    Shutdown,
    TracedCall,
    UnencodableMessage,
    decode_frames_untrusted,
    encode_frame,
)
from tests.tables import CASE_NAMES, every_state_and_input, path_to

REPO = Path(__file__).resolve().parents[2]

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARENT_KINDS = (Call, TracedCall, Cancel, Ping, Shutdown, LeaseGrant)
"""What the parent sends and the child receives."""
CHILD_KINDS = (Hello, Ack, Event, Result, Error, Pong, LeaseRequest, LeaseRelease)
"""What the child sends and the parent receives."""
CALL_KINDS = (Call, TracedCall, Ack, Event, Result, Error)
"""The frames that move a call through ``CALL_TRANSITIONS``."""
REPLY_KINDS = (Ack, Event, Result, Error)
"""The child's frames of a call."""
RECEIVER: dict[type, Role] = {
    **{kind: Role.CHILD for kind in PARENT_KINDS},
    **{kind: Role.PARENT for kind in CHILD_KINDS},
}
SENDER = {kind: Role.PARENT if role is Role.CHILD else Role.CHILD for kind, role in RECEIVER.items()}

HELLO = Hello(version=PROTOCOL_VERSION, pid=4242, capacity=2, capabilities=["predict"], versions={"x": "1"})

# -- strategies --------------------------------------------------------------------------------------

int64s = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=False)  # nan round-trips, but nan != nan
texts = st.text(max_size=16)
json_values = st.recursive(
    st.none() | st.booleans() | int64s | floats | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
"""JSON-like data: what params, values, event data and error details carry."""

hellos = st.builds(
    Hello,
    version=st.just(PROTOCOL_VERSION),
    pid=st.integers(1, 2**31),
    capacity=st.integers(1, 256),
    capabilities=st.lists(texts, max_size=4),
    versions=st.dictionaries(texts, texts, max_size=4),
)
calls = st.builds(
    Call,
    id=int64s,
    method=texts,
    params=json_values,
    timeout=st.none() | floats,
    flags=st.integers(0, 2**31),
)
traced_calls = st.builds(
    TracedCall,
    id=int64s,
    method=texts,
    params=json_values,
    timeout=st.none() | floats,
    flags=st.integers(0, 2**31),
    trace=texts,
)
acks = st.builds(Ack, id=int64s)
events = st.builds(Event, id=int64s, seq=st.integers(0, 2**32), data=json_values)
results = st.builds(Result, id=int64s, value=json_values)
errors = st.builds(
    Error,
    id=int64s,
    code=st.sampled_from(ErrorCode) | texts,
    type=texts,
    message=st.text(max_size=40),
    details=json_values,
)
cancels = st.builds(Cancel, id=int64s)
pings = st.builds(Ping, nonce=int64s)
pongs = st.builds(Pong, nonce=int64s)
shutdowns = st.builds(Shutdown, grace=floats)
lease_requests = st.builds(LeaseRequest, lease=int64s, call=int64s, lm=texts, tokens=int64s)
lease_grants = st.builds(LeaseGrant, lease=int64s, ok=st.booleans(), reason=texts)
lease_releases = st.builds(
    LeaseRelease, lease=int64s, status=st.integers(0, 599), retry_after=st.none() | floats, tokens=int64s
)

MESSAGES: dict[type, st.SearchStrategy[Any]] = {
    Hello: hellos,
    Call: calls,
    TracedCall: traced_calls,
    Ack: acks,
    Event: events,
    Result: results,
    Error: errors,
    Cancel: cancels,
    Ping: pings,
    Pong: pongs,
    Shutdown: shutdowns,
    LeaseRequest: lease_requests,
    LeaseGrant: lease_grants,
    LeaseRelease: lease_releases,
}
TAGS: dict[type, str] = {
    Hello: "hello",
    Call: "call",
    TracedCall: "tcall",
    Ack: "ack",
    Event: "event",
    Result: "result",
    Error: "error",
    Cancel: "cancel",
    Ping: "ping",
    Pong: "pong",
    Shutdown: "shutdown",
    LeaseRequest: "lease",
    LeaseGrant: "grant",
    LeaseRelease: "release",
}
"""The kind string, first element of each message's msgpack array."""
any_messages = st.one_of(*MESSAGES.values())
terminals = results | errors

# -- helpers -----------------------------------------------------------------------------------------


def drain(conn: Connection) -> list[Any]:
    """Every message ``conn`` can return now, up to ``NEED_DATA``."""
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def one(conn: Connection) -> Any:
    """The single message ``conn`` can return now."""
    [message] = drain(conn)
    return message


def frame_with_body(body: bytes, *, magic: int = MAGIC, version: int = PROTOCOL_VERSION) -> bytes:
    return HEADER.pack(magic, version, len(body)) + body


def chunks_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed(conn: Connection, chunks: list[bytes]) -> list[Any]:
    """Feed ``chunks`` (then EOF), draining after each, and return what came out."""
    out = []
    for chunk in chunks:
        if chunk:  # b"" would mean EOF
            conn.receive_data(chunk)
            out += drain(conn)
    conn.receive_data(b"")
    out += drain(conn)
    return out


class ConnectionPair:
    """A parent and a child ``Connection`` joined by a fake link."""

    def __init__(self, **kwargs: Any) -> None:
        self.parent = Connection(Role.PARENT, **kwargs)
        self.child = Connection(Role.CHILD, **kwargs)

    def to_child(self, message: Any) -> Any:
        self.child.receive_data(self.parent.send(message))
        return one(self.child)

    def to_parent(self, message: Any) -> list[Any]:
        self.parent.receive_data(self.child.send(message))
        return drain(self.parent)

    @classmethod
    def connected(cls, **kwargs: Any) -> ConnectionPair:
        pair = cls(**kwargs)
        assert pair.to_parent(HELLO) == [HELLO]
        return pair


def parent_after_hello(**kwargs: Any) -> Connection:
    conn = Connection(Role.PARENT, **kwargs)
    conn.receive_data(encode_frame(HELLO))
    assert one(conn) == HELLO
    return conn


def call_frame(kind: type, call_id: int, seq: int = 0) -> Any:
    """A frame of ``kind`` (one of ``CALL_KINDS``) for call ``call_id``."""
    if kind is Call:
        return Call(id=call_id, method="m")
    if kind is TracedCall:
        return TracedCall(id=call_id, method="m", trace="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    if kind is Event:
        return Event(id=call_id, seq=seq, data={"chunk": seq})
    if kind is Error:
        return Error(id=call_id, code=ErrorCode.INTERNAL, type="RuntimeError", message="boom")
    if kind is Result:
        return Result(id=call_id, value="done")
    return kind(id=call_id)


def frame_of(kind: type, call_id: int) -> Any:
    """A frame of any ``kind``; a call's frames (and a cancel) are for call ``call_id``."""
    others = {
        Hello: HELLO,
        Cancel: Cancel(id=call_id),
        Ping: Ping(1),
        Pong: Pong(1),
        Shutdown: Shutdown(1.0),
        LeaseRequest: LeaseRequest(lease=call_id, call=call_id, lm="openai/x"),
        LeaseGrant: LeaseGrant(lease=call_id),
        LeaseRelease: LeaseRelease(lease=call_id, status=200),
    }
    return others[kind] if kind in others else call_frame(kind, call_id)


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MESSAGES), ids=lambda kind: kind.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_every_kind_round_trips(kind: type, data: st.DataObject) -> None:
    message = data.draw(MESSAGES[kind])
    sender = Connection(SENDER[kind], check_states=False)
    receiver = Connection(RECEIVER[kind], check_states=False)
    frame = sender.send(message)
    assert frame == encode_frame(message)
    assert msgspec.msgpack.decode(frame[HEADER_SIZE:])[0] == TAGS[kind]
    receiver.receive_data(frame)
    got = receiver.next_event()
    assert type(got) is kind
    assert got == message
    assert receiver.next_event() is NEED_DATA
    assert receiver.buffered_bytes == 0
    assert decode_frames_untrusted(frame, RECEIVER[kind]) == [message]


@ROUND_TRIP
@given(
    hello=hellos,
    call=calls,
    chunks=st.lists(json_values, max_size=4),
    terminal=terminals,
    ping=pings,
    rejected=calls,
    rejection=errors,
    shutdown=shutdowns,
)
def test_conversation_round_trips_with_state_checks(
    hello: Hello,
    call: Call,
    chunks: list[Any],
    terminal: Result | Error,
    ping: Ping,
    rejected: Call,
    rejection: Error,
    shutdown: Shutdown,
) -> None:
    pair = ConnectionPair()
    assert pair.to_parent(hello) == [hello]
    assert pair.parent.hello == hello

    assert pair.to_child(ping) == ping
    assert pair.to_parent(Pong(nonce=ping.nonce)) == [Pong(nonce=ping.nonce)]

    assert pair.to_child(call) == call
    assert pair.parent.call_state(call.id) is CallState.AWAITING_ACK
    assert pair.child.call_state(call.id) is CallState.AWAITING_ACK
    assert pair.to_parent(Ack(id=call.id)) == [Ack(id=call.id)]
    assert pair.parent.call_state(call.id) is CallState.RUNNING
    for seq, chunk in enumerate(chunks):
        event = Event(id=call.id, seq=seq, data=chunk)
        assert pair.to_parent(event) == [event]
    terminal = msgspec.structs.replace(terminal, id=call.id)
    assert pair.to_parent(terminal) == [terminal]
    assert pair.parent.pending_calls == pair.child.pending_calls == 0
    assert pair.to_child(Cancel(id=call.id)) == Cancel(id=call.id)  # a cancel that crossed the reply

    rejected = msgspec.structs.replace(rejected, id=call.id)  # the id is free again
    assert pair.to_child(rejected) == rejected
    rejection = msgspec.structs.replace(rejection, id=call.id)
    assert pair.to_parent(rejection) == [rejection]  # rejected before any ack
    assert pair.parent.pending_calls == 0

    assert pair.to_child(shutdown) == shutdown
    assert pair.parent.late_frames == 0


def test_sets_and_tuples_are_carried_as_arrays() -> None:
    # msgspec encodes set, frozenset and tuple natively as msgpack arrays: they arrive as lists.
    frame = encode_frame(Call(id=1, method="m", params={"s": {3}, "f": frozenset({4}), "t": (1, 2)}))
    [call] = decode_frames_untrusted(frame, Role.CHILD)
    assert isinstance(call, Call)
    assert call.params == {"s": [3], "f": [4], "t": [1, 2]}


def test_golden_frames() -> None:
    # The byte layout of docs/protocol.md; changing it is an incompatible change (bump the version).
    call = Call(id=1, method="run", params={"q": "hi"}, timeout=30.0, flags=FLAG_IDEMPOTENT)
    assert encode_frame(call).hex(" ") == (
        "d5 01 00 00 00 1b 96 a4 63 61 6c 6c 01 a3 72 75 6e 81 a1 71 a2 68 69 cb 40 3e 00 00 00 00 00 00 01"
    )
    assert encode_frame(Ack(id=1)).hex(" ") == "d5 01 00 00 00 06 92 a3 61 63 6b 01"
    assert HEADER.unpack(encode_frame(call)[:HEADER_SIZE]) == (0xD5, PROTOCOL_VERSION, 27)


def test_trailing_fields_may_be_omitted_and_extra_ones_are_ignored() -> None:
    # What makes appending a defaulted field a compatible change.
    short = frame_with_body(msgspec.msgpack.encode(["call", 5, "m"]))
    assert decode_frames_untrusted(short, Role.CHILD) == [Call(id=5, method="m")]
    long = frame_with_body(msgspec.msgpack.encode(["ack", 5, "a field from the future"]))
    assert decode_frames_untrusted(long, Role.PARENT) == [Ack(id=5)]
    too_short = frame_with_body(msgspec.msgpack.encode(["call", 5]))
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        decode_frames_untrusted(too_short, Role.CHILD)


# -- framing: splits, batches, limits, EOF -----------------------------------------------------------


def conversation_stream(hello: Hello, data: list[Any], terminal: Result | Error) -> tuple[bytes, list[Any]]:
    """A valid child -> parent byte stream for call 1 (which the parent sent), and its messages."""
    messages: list[Any] = [hello, Ack(id=1)]
    messages += [Event(id=1, seq=seq, data=d) for seq, d in enumerate(data)]
    messages += [msgspec.structs.replace(terminal, id=1), Pong(nonce=9)]
    return b"".join(encode_frame(m) for m in messages), messages


def parent_waiting_for_call_1() -> Connection:
    conn = Connection(Role.PARENT)
    conn.send(Call(id=1, method="predict"))
    return conn


@SLOW
@given(hello=hellos, data=st.lists(json_values, max_size=3), terminal=terminals)
def test_split_at_every_point_decodes_identically(hello: Hello, data: list[Any], terminal: Any) -> None:
    stream, expected = conversation_stream(hello, data, terminal)
    for cut in range(len(stream) + 1):
        assert feed(parent_waiting_for_call_1(), [stream[:cut], stream[cut:]]) == expected


@ROUND_TRIP
@given(
    hello=hellos,
    data=st.lists(json_values, max_size=6),
    terminal=terminals,
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_chunking_decodes_identically(
    hello: Hello, data: list[Any], terminal: Any, cuts: list[int]
) -> None:
    stream, expected = conversation_stream(hello, data, terminal)
    assert feed(parent_waiting_for_call_1(), chunks_at(stream, cuts)) == expected
    assert feed(parent_waiting_for_call_1(), [stream]) == expected
    assert feed(parent_waiting_for_call_1(), [stream[i : i + 1] for i in range(len(stream))]) == expected


@pytest.mark.parametrize("chunk_size", [None, 7919, 1])
def test_many_frames_in_one_read(chunk_size: int | None) -> None:
    # > 64 KiB of frames, so the receive buffer is compacted while a partial frame is pending.
    messages: list[Any] = [HELLO, Ack(id=1)]
    messages += [Event(id=1, seq=seq, data="x" * (seq % 97)) for seq in range(3000)]
    messages.append(Result(id=1, value={"answer": 42}))
    stream = b"".join(encode_frame(m) for m in messages)
    assert len(stream) > 128 * 1024
    if chunk_size is None:
        chunks = [stream]
    elif chunk_size == 1:
        start, stop = len(stream) // 8, len(stream) // 8 + 2000  # byte at a time over a stretch only
        chunks = [stream[:start], *(stream[i : i + 1] for i in range(start, stop)), stream[stop:]]
    else:
        chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
    assert b"".join(chunks) == stream
    conn = parent_waiting_for_call_1()
    assert feed(conn, chunks) == messages
    assert conn.buffered_bytes == 0
    assert conn.pending_calls == 0


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_oversized_frame_rejected_on_its_header(role: Role) -> None:
    conn = Connection(role)
    header = HEADER.pack(MAGIC, PROTOCOL_VERSION, 1 << 30)  # a 1 GiB frame
    conn.receive_data(header[:-1])
    assert conn.next_event() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        conn.receive_data(header[-1:])
    assert conn.buffered_bytes == HEADER_SIZE
    # The connection stays broken: no body is ever buffered.
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        conn.receive_data(b"\0" * 65536)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        conn.next_event()
    assert conn.buffered_bytes == HEADER_SIZE


def test_default_frame_limit_is_16_mib_and_checked_on_the_header() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 16 * 1024 * 1024
    conn = Connection(Role.CHILD)
    conn.receive_data(HEADER.pack(MAGIC, PROTOCOL_VERSION, DEFAULT_MAX_FRAME_BYTES))
    assert conn.next_event() is NEED_DATA  # exactly at the limit: fine, waits for the body
    with pytest.raises(RemoteProtocolError):
        Connection(Role.CHILD).receive_data(HEADER.pack(MAGIC, PROTOCOL_VERSION, DEFAULT_MAX_FRAME_BYTES + 1))


def test_frame_limit_boundary() -> None:
    frame = encode_frame(Call(id=1, method="m", params="p" * 100))
    body_size = len(frame) - HEADER_SIZE
    conn = Connection(Role.CHILD, max_frame_bytes=body_size)
    conn.receive_data(frame)
    assert one(conn).params == "p" * 100
    conn = Connection(Role.CHILD, max_frame_bytes=body_size - 1)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        conn.receive_data(frame)


def test_oversized_frame_after_a_valid_one_in_the_same_read() -> None:
    conn = Connection(Role.CHILD, max_frame_bytes=1000)
    conn.receive_data(encode_frame(Ping(nonce=1)) + HEADER.pack(MAGIC, PROTOCOL_VERSION, 1001))
    assert conn.next_event() == Ping(nonce=1)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"\0" * 1001)


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
@pytest.mark.parametrize("partial", range(1, HEADER_SIZE))
def test_eof_inside_a_header(role: Role, partial: int) -> None:
    conn = Connection(role)
    frame = encode_frame(Ping(nonce=1) if role is Role.CHILD else HELLO)
    conn.receive_data(frame[:partial])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="EOF inside a frame header"):
        conn.next_event()


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_eof_inside_a_body(role: Role) -> None:
    frame = encode_frame(Ping(nonce=1) if role is Role.CHILD else HELLO)
    for cut in range(HEADER_SIZE, len(frame)):
        conn = Connection(role)
        conn.receive_data(frame[:cut])
        assert conn.next_event() is NEED_DATA
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="EOF inside a frame body"):
            conn.next_event()
    with pytest.raises(RemoteProtocolError):
        decode_frames_untrusted(frame[:-1], role)


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_clean_eof_between_frames(role: Role) -> None:
    messages: list[Any] = [Ping(nonce=1), Cancel(id=3)] if role is Role.CHILD else [HELLO, Pong(nonce=1)]
    conn = Connection(role)
    conn.receive_data(b"".join(encode_frame(m) for m in messages))
    conn.receive_data(b"")
    assert drain(conn) == messages
    assert conn.next_event() is NEED_DATA
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")  # a second EOF is harmless
    with pytest.raises(LocalProtocolError, match="after EOF"):
        conn.receive_data(b"more")


def test_clean_eof_at_the_very_start() -> None:
    conn = Connection(Role.PARENT)
    conn.receive_data(b"")
    assert conn.next_event() is NEED_DATA
    assert decode_frames_untrusted(b"", Role.PARENT) == []


# -- fuzz: garbage either parses or raises a ProtocolError -------------------------------------------

tags = st.sampled_from(sorted(TAGS.values())) | texts
fuzz_fields = st.lists(json_values | st.binary(max_size=8) | int64s, max_size=7)
wellformed_bodies = st.builds(lambda tag, fields: msgspec.msgpack.encode([tag, *fields]), tags, fuzz_fields)
"""Valid msgpack, roughly message-shaped: exercises the typed decoding."""


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    frame = bytearray(encode_frame(draw(any_messages)))
    for _ in range(draw(st.integers(1, 3))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame)


garbage_pieces = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(frame_with_body),
    wellformed_bodies.map(frame_with_body),
    any_messages.map(encode_frame),
    mutated_frames(),
    any_messages.map(encode_frame).flatmap(lambda f: st.integers(0, len(f)).map(lambda n: f[:n])),
)
garbage = st.lists(garbage_pieces, max_size=5).map(b"".join)

PREAMBLE = {Role.PARENT: encode_frame(HELLO), Role.CHILD: encode_frame(Call(id=1, method="m"))}


def assert_parses_or_protocol_error(role: Role, chunks: list[bytes]) -> None:
    receivable = CHILD_KINDS if role is Role.PARENT else PARENT_KINDS
    conn = Connection(role, max_frame_bytes=4096)
    out: list[Any] = []
    try:
        out += feed(conn, chunks)
    except ProtocolError:
        pass
    except Exception as exc:  # anything else escaping is the bug this test hunts
        pytest.fail(f"{type(exc).__name__} escaped from the {role.value}: {exc!r}")
    assert all(isinstance(message, receivable) for message in out)


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
@pytest.mark.parametrize("preamble", [False, True], ids=["bare", "after-preamble"])
@FUZZ
@given(data=garbage)
def test_garbage_fed_whole(role: Role, preamble: bool, data: bytes) -> None:
    if preamble:
        data = PREAMBLE[role] + data
    assert_parses_or_protocol_error(role, [data])


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
@pytest.mark.parametrize("preamble", [False, True], ids=["bare", "after-preamble"])
@FUZZ
@given(data=garbage)
def test_garbage_fed_byte_at_a_time(role: Role, preamble: bool, data: bytes) -> None:
    if preamble:
        data = PREAMBLE[role] + data
    assert_parses_or_protocol_error(role, [data[i : i + 1] for i in range(len(data))])


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
@FUZZ
@given(data=garbage, cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_garbage_fed_in_random_chunks(role: Role, data: bytes, cuts: list[int]) -> None:
    assert_parses_or_protocol_error(role, chunks_at(PREAMBLE[role] + data, cuts))


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
@FUZZ
@given(data=garbage)
def test_decode_frames_untrusted_raises_only_remote_protocol_errors(role: Role, data: bytes) -> None:
    try:
        messages = decode_frames_untrusted(data, role)
    except RemoteProtocolError:
        return
    receivable = CHILD_KINDS if role is Role.PARENT else PARENT_KINDS
    assert all(isinstance(message, receivable) for message in messages)


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_deeply_nested_body_is_a_remote_protocol_error(role: Role) -> None:
    # Regression: msgspec raises RecursionError on very deep nesting; it must not escape next_event().
    tag, fields = ("call", b"\x01\xa1m") if role is Role.CHILD else ("result", b"\x01")
    body = b"\x94" if role is Role.CHILD else b"\x93"
    body += msgspec.msgpack.encode(tag) + fields + b"\x91" * 200_000 + b"\xc0"
    conn = Connection(role)
    if role is Role.PARENT:
        conn = parent_after_hello()
        conn.send(Call(id=1, method="m"))
        conn.receive_data(encode_frame(Ack(id=1)))
        assert one(conn) == Ack(id=1)
    conn.receive_data(frame_with_body(body))
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        conn.next_event()


def test_frames_after_an_error_keep_raising() -> None:
    conn = Connection(Role.CHILD)
    with pytest.raises(RemoteProtocolError, match="magic") as first:
        conn.receive_data(b"\x00" * HEADER_SIZE)
    attempts = [lambda: conn.receive_data(encode_frame(Ping(nonce=1))), conn.next_event]
    attempts.append(lambda: conn.receive_data(b""))
    for attempt in attempts:
        with pytest.raises(RemoteProtocolError) as again:
            attempt()
        assert again.value is first.value


# -- headers and hello -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_bad_magic(role: Role) -> None:
    body = encode_frame(HELLO)[HEADER_SIZE:]
    with pytest.raises(RemoteProtocolError, match="magic"):
        Connection(role).receive_data(frame_with_body(body, magic=0x7B))  # e.g. a stray '{'


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 255])
def test_wrong_protocol_version_in_header(role: Role, version: int) -> None:
    message = HELLO if role is Role.PARENT else Ping(nonce=1)
    body = encode_frame(message)[HEADER_SIZE:]
    conn = Connection(role)
    with pytest.raises(RemoteProtocolError, match="unsupported protocol version"):
        conn.receive_data(frame_with_body(body, version=version))


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1])
@pytest.mark.parametrize("side", ["sent", "received"])
def test_wrong_protocol_version_in_hello(side: str, version: int) -> None:
    hello = msgspec.structs.replace(HELLO, version=version)
    role, refusal = apply_as(side, hello)
    conn = Connection(role)
    with pytest.raises(refusal, match=f"protocol {version}"):
        meet(conn, hello)
    assert conn.hello is None and conn.state is ConnectionState.AWAITING_HELLO


@pytest.mark.parametrize("first", [Ack(id=1), Pong(nonce=1), Result(id=1), Event(id=1, seq=0)])
def test_parent_must_receive_hello_first(first: Any) -> None:
    conn = Connection(Role.PARENT)
    conn.send(Call(id=1, method="m"))
    conn.receive_data(encode_frame(first))
    with pytest.raises(RemoteProtocolError, match="first frame must be hello"):
        conn.next_event()


def test_second_hello() -> None:
    conn = parent_after_hello()
    assert conn.hello == HELLO
    conn.receive_data(encode_frame(HELLO))
    with pytest.raises(RemoteProtocolError, match="second hello"):
        conn.next_event()


WRONG_DIRECTION = [
    *[(Role.PARENT, message) for message in (Call(id=1, method="m"), Cancel(id=1), Ping(nonce=1))],
    (Role.PARENT, Shutdown(grace=1.0)),
    *[(Role.CHILD, message) for message in (HELLO, Ack(id=1), Event(id=1, seq=0), Result(id=1))],
    *[(Role.CHILD, message) for message in (Error(id=1, code="internal"), Pong(nonce=1))],
]


@pytest.mark.parametrize(
    ("role", "message"), WRONG_DIRECTION, ids=[f"{r.value}-{type(m).__name__}" for r, m in WRONG_DIRECTION]
)
def test_wrong_direction_kind_is_remote_protocol_error(role: Role, message: Any) -> None:
    conn = parent_after_hello() if role is Role.PARENT else Connection(role)
    if role is Role.PARENT:
        conn.send(Call(id=1, method="m"))
    else:
        conn.receive_data(encode_frame(Call(id=1, method="m")))
        assert one(conn) == Call(id=1, method="m")
    conn.receive_data(encode_frame(message))
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        conn.next_event()


# -- the conversation's tables, applied alike to what is sent and what is received -------------------


def parent_in_state(state: CallState, call_id: int = 7) -> Connection:
    conn = parent_after_hello()
    conn.send(Call(id=call_id, method="m"))
    if state is not CallState.AWAITING_ACK:
        conn.receive_data(encode_frame(Ack(id=call_id)))
        assert one(conn) == Ack(id=call_id)
    if state is CallState.DONE:
        conn.receive_data(encode_frame(Result(id=call_id)))
        assert one(conn) == Result(id=call_id)
    assert conn.call_state(call_id) is state
    return conn


def child_in_state(state: CallState, call_id: int = 7) -> Connection:
    conn = Connection(Role.CHILD)
    conn.send(HELLO)
    conn.receive_data(encode_frame(Call(id=call_id, method="m")))
    assert one(conn) == Call(id=call_id, method="m")
    if state is not CallState.AWAITING_ACK:
        conn.send(Ack(id=call_id))
    if state is CallState.DONE:
        conn.send(Result(id=call_id))
    assert conn.call_state(call_id) is state
    return conn


def meet(conn: Connection, message: Any) -> None:
    """``message`` goes through ``conn`` the way its role meets it: sent if it is its own kind, else
    received (and returned by ``next_event``)."""
    if SENDER[type(message)] is conn.role:
        assert conn.send(message) == encode_frame(message)
    else:
        conn.receive_data(encode_frame(message))
        assert one(conn) == message


def conn_in(role: Role, call: CallState, *, hello: bool = True, call_id: int = 7) -> Connection:
    """A ``role`` connection, past the hello or not, whose call ``call_id`` was taken to ``call`` through
    ``CALL_TRANSITIONS`` by frames (as a real conversation does)."""
    conn = Connection(role)
    if hello:
        meet(conn, HELLO)
    for kind in path_to(CALL_TRANSITIONS, CallState.DONE, call):
        meet(conn, call_frame(kind, call_id))
    assert conn.call_state(call_id) is call
    return conn


SIDES = ("sent", "received")


def apply_as(side: str, message: Any) -> tuple[Role, type[ProtocolError]]:
    """The role that meets ``message`` when it is ``sent`` or ``received``, and its error for a frame it
    refuses."""
    if side == "sent":
        return SENDER[type(message)], LocalProtocolError
    return RECEIVER[type(message)], RemoteProtocolError


def test_the_tables_cover_the_kinds_the_messages_declare() -> None:
    assert set(wire.PARENT_KINDS) == set(PARENT_KINDS) and set(wire.CHILD_KINDS) == set(CHILD_KINDS)
    assert set(CALL_KINDS) == wire.CALL_KINDS
    assert {kind for _, kind in CALL_TRANSITIONS} == set(CALL_KINDS)
    assert {kind for _, kind in CONNECTION_TRANSITIONS} == set(PARENT_KINDS + CHILD_KINDS)


def test_call_transitions_table_shape() -> None:
    calls = (Call, TracedCall)
    assert not any(state is CallState.DONE for state, kind in CALL_TRANSITIONS if kind not in calls)
    for call in calls:
        assert [state for state, kind in CALL_TRANSITIONS if kind is call] == [CallState.DONE]  # a free id
    assert CALL_TRANSITIONS[CallState.AWAITING_ACK, Ack] is CallState.RUNNING
    assert CALL_TRANSITIONS[CallState.AWAITING_ACK, Error] is CallState.DONE
    assert (CallState.AWAITING_ACK, Result) not in CALL_TRANSITIONS


def test_connection_transitions_table_shape() -> None:
    # The hello comes first and once; the parent's frames need not wait for it.
    assert CONNECTION_TRANSITIONS[ConnectionState.AWAITING_HELLO, Hello] is ConnectionState.OPEN
    assert (ConnectionState.OPEN, Hello) not in CONNECTION_TRANSITIONS
    early = {kind for state, kind in CONNECTION_TRANSITIONS if state is ConnectionState.AWAITING_HELLO}
    assert early == {Hello, *PARENT_KINDS} - {LeaseGrant}  # leases come after the hello
    assert all(new is state for (state, kind), new in CONNECTION_TRANSITIONS.items() if kind is not Hello)


@pytest.mark.parametrize(CASE_NAMES, every_state_and_input(CALL_TRANSITIONS, CallState, CALL_KINDS))
@pytest.mark.parametrize("side", SIDES)
def test_every_call_state_and_frame(
    side: str, state: CallState, event: type, expected: CallState | None
) -> None:
    message = call_frame(event, 7)
    role, refusal = apply_as(side, message)
    conn = conn_in(role, state)
    if expected is None:
        with pytest.raises(refusal):
            meet(conn, message)
        if refusal is LocalProtocolError:
            assert conn.call_state(7) is state  # unchanged
    else:
        meet(conn, message)
        assert conn.call_state(7) is expected
        assert conn.pending_calls == (expected is not CallState.DONE)


WELCOMED_IN: dict[type, CallState] = {
    Ack: CallState.AWAITING_ACK,
    Error: CallState.AWAITING_ACK,
    Event: CallState.RUNNING,
    Result: CallState.RUNNING,
}
"""The call state in which a call frame passes ``CALL_TRANSITIONS`` (others: ``DONE``, a free id)."""
LEASE_WELCOMED_IN: dict[type, LeaseState] = {
    LeaseGrant: LeaseState.REQUESTED,
    LeaseRelease: LeaseState.GRANTED,
}
"""The lease state in which a lease frame passes ``LEASE_TRANSITIONS`` (a request: ``FREE``)."""


@pytest.mark.parametrize(
    CASE_NAMES,
    every_state_and_input(CONNECTION_TRANSITIONS, ConnectionState, PARENT_KINDS + CHILD_KINDS),
)
@pytest.mark.parametrize("side", SIDES)
def test_every_connection_state_and_frame(
    side: str, state: ConnectionState, event: type, expected: ConnectionState | None
) -> None:
    message = frame_of(event, 7)
    role, refusal = apply_as(side, message)
    # Call 7 is where the frame passes the call table, so that only the connection's table decides
    # (before the hello no call can run: a frame that needs one is refused by the hello rule first).
    call = WELCOMED_IN.get(event, CallState.DONE)
    opened = state is ConnectionState.OPEN
    conn = conn_in(
        role, call if opened or call is not CallState.RUNNING else CallState.AWAITING_ACK, hello=opened
    )
    if opened and event in LEASE_WELCOMED_IN:  # lease 7 where the frame passes LEASE_TRANSITIONS
        for kind in path_to(wire.LEASE_TRANSITIONS, LeaseState.FREE, LEASE_WELCOMED_IN[event]):
            meet(conn, frame_of(kind, 7))
    assert conn.state is state
    if expected is None:
        with pytest.raises(refusal, match="hello"):
            meet(conn, message)
        if refusal is LocalProtocolError:
            assert conn.state is state
    else:
        meet(conn, message)
        assert conn.state is expected
        assert conn.hello == (HELLO if expected is ConnectionState.OPEN else None)


stray_frames = st.one_of(
    st.just(HELLO),
    st.builds(Call, id=st.integers(1, 2), method=st.just("m")),
    st.builds(Ack, id=st.integers(1, 2)),
    st.builds(Event, id=st.integers(1, 2), seq=st.integers(0, 2)),
    st.builds(Result, id=st.integers(1, 2)),
    st.builds(Error, id=st.integers(1, 2), code=st.just(ErrorCode.INTERNAL)),
    st.builds(Cancel, id=st.integers(1, 2)),
    st.just(Ping(nonce=1)),
    st.just(Pong(nonce=1)),
    st.just(Shutdown(grace=1.0)),
)
"""Any frame of calls 1 and 2."""


@st.composite
def conversations(draw: st.DrawFn) -> list[Any]:
    """A valid conversation (the hello, then calls 1 and 2, each used up to twice, interleaved, with
    pings, pongs and cancels between), then, in most examples, one mistake: a frame dropped,
    repeated, swapped with the next, or a stray one inserted."""
    lives: list[list[Any]] = []
    for call_id in (1, 2):
        frames: list[Any] = []
        for _ in range(draw(st.integers(0, 2))):
            frames.append(Call(id=call_id, method="m"))
            if draw(st.booleans()):
                frames.append(Error(id=call_id, code=ErrorCode.UNKNOWN_METHOD))  # rejected
                continue
            frames.append(Ack(id=call_id))
            frames += [Event(id=call_id, seq=seq) for seq in range(draw(st.integers(0, 2)))]
            frames.append(draw(st.sampled_from([Result(id=call_id), Error(id=call_id, code="x")])))
        lives.append(frames)
    conversation: list[Any] = [HELLO]
    while any(lives):
        life = draw(st.sampled_from([life for life in lives if life]))
        conversation.append(life.pop(0))
        if draw(st.integers(0, 5)) == 0:
            conversation.append(draw(st.sampled_from([Ping(nonce=1), Pong(nonce=1), Cancel(id=1)])))
    mistake = draw(st.sampled_from(["none", "drop", "repeat", "swap", "stray", "stray"]))
    at = draw(st.integers(0, len(conversation) - 1))
    if mistake == "drop":
        del conversation[at]
    elif mistake == "repeat":
        conversation.insert(at, conversation[at])
    elif mistake == "swap" and at + 1 < len(conversation):
        conversation[at], conversation[at + 1] = conversation[at + 1], conversation[at]
    elif mistake == "stray":
        conversation.insert(at, draw(stray_frames))
    return conversation


@FUZZ
@given(frames=conversations())
def test_both_ends_agree_on_every_frame(frames: list[Any]) -> None:
    # The rules are written once: whatever the sender may send, the receiver accepts, to the same
    # states; what the sender may not send, the receiver refuses, for the same reason.
    pair = ConnectionPair()
    for message in frames:
        parent_sends = type(message) in PARENT_KINDS
        sender, receiver = (pair.parent, pair.child) if parent_sends else (pair.child, pair.parent)
        try:
            frame = sender.send(message)
        except LocalProtocolError as local:
            receiver.receive_data(encode_frame(message))
            with pytest.raises(RemoteProtocolError) as remote:
                receiver.next_event()
            assert str(remote.value) == str(local)
            return
        receiver.receive_data(frame)
        assert one(receiver) == message
        assert pair.parent.state is pair.child.state
        assert [pair.parent.call_state(i) for i in (1, 2)] == [pair.child.call_state(i) for i in (1, 2)]
    assert pair.parent.pending_calls == pair.child.pending_calls


def test_ack_before_result() -> None:
    pair = ConnectionPair.connected()
    pair.to_child(Call(id=1, method="m"))
    with pytest.raises(LocalProtocolError, match="awaiting ack"):
        pair.child.send(Result(id=1, value=1))
    pair.parent.receive_data(encode_frame(Result(id=1, value=1)))
    with pytest.raises(RemoteProtocolError, match="awaiting ack"):
        pair.parent.next_event()


def test_event_seq_must_count_from_zero() -> None:
    conn = parent_in_state(CallState.RUNNING)
    conn.receive_data(encode_frame(Event(id=7, seq=0)) + encode_frame(Event(id=7, seq=1)))
    assert [e.seq for e in drain(conn)] == [0, 1]
    conn.receive_data(encode_frame(Event(id=7, seq=3)))
    with pytest.raises(RemoteProtocolError, match="seq 3 for call 7, expected 2"):
        conn.next_event()


@pytest.mark.parametrize("seq", [1, -1, 2**40])
def test_first_event_with_wrong_seq(seq: int) -> None:
    conn = parent_in_state(CallState.RUNNING)
    conn.receive_data(encode_frame(Event(id=7, seq=seq)))
    with pytest.raises(RemoteProtocolError, match="expected 0"):
        conn.next_event()


@pytest.mark.parametrize("late", [Event(id=7, seq=0), Result(id=7), Error(id=7, code="x"), Ack(id=7)])
def test_frame_after_result(late: Any) -> None:
    conn = parent_in_state(CallState.DONE)
    conn.receive_data(encode_frame(late))
    with pytest.raises(RemoteProtocolError, match="which is not pending"):
        conn.next_event()


@pytest.mark.parametrize("kind", REPLY_KINDS, ids=lambda kind: kind.__name__)
def test_frame_for_a_never_sent_id(kind: type) -> None:
    conn = parent_in_state(CallState.RUNNING)
    conn.receive_data(encode_frame(call_frame(kind, 8)))
    with pytest.raises(RemoteProtocolError, match="call 8, which is not pending"):
        conn.next_event()


def test_event_seq_restarts_for_a_reused_id() -> None:
    conn = parent_in_state(CallState.RUNNING)
    conn.receive_data(encode_frame(Event(id=7, seq=0)) + encode_frame(Error(id=7, code="timeout")))
    assert len(drain(conn)) == 2
    conn.send(Call(id=7, method="again"))
    conn.receive_data(encode_frame(Ack(id=7)) + encode_frame(Event(id=7, seq=0)))
    assert drain(conn) == [Ack(id=7), Event(id=7, seq=0)]


def test_abandoned_calls_late_frames_are_dropped_and_counted() -> None:
    conn = parent_after_hello()
    conn.send(Call(id=1, method="slow"))
    conn.send(Call(id=2, method="fast"))
    assert conn.abandon(1) is True
    assert conn.abandon(99) is False  # never sent: nothing to abandon
    stream: list[Any] = [
        Ack(id=1),
        Ack(id=2),
        Event(id=1, seq=0, data="late"),
        Result(id=2, value="ok"),
        Pong(nonce=5),
        Result(id=1, value="late"),
    ]
    conn.receive_data(b"".join(encode_frame(m) for m in stream))
    assert drain(conn) == [Ack(id=2), Result(id=2, value="ok"), Pong(nonce=5)]
    assert conn.late_frames == 3
    assert conn.pending_calls == 0
    assert conn.abandon(1) is False  # finished
    # After its terminal frame the id is unknown again: a further frame is a protocol error...
    conn.receive_data(encode_frame(Event(id=1, seq=1)))
    with pytest.raises(RemoteProtocolError, match="which is not pending"):
        conn.next_event()


def test_abandoned_id_reused_is_delivered_again() -> None:
    conn = parent_after_hello()
    conn.send(Call(id=1, method="m"))
    conn.abandon(1)
    conn.receive_data(encode_frame(Error(id=1, code=ErrorCode.CANCELLED)))  # rejected before the ack
    assert drain(conn) == []
    assert conn.late_frames == 1
    conn.send(Call(id=1, method="m"))
    conn.receive_data(encode_frame(Ack(id=1)) + encode_frame(Result(id=1, value=2)))
    assert drain(conn) == [Ack(id=1), Result(id=1, value=2)]
    assert conn.late_frames == 1


def test_abandoned_calls_frames_are_still_checked() -> None:
    conn = parent_in_state(CallState.RUNNING)
    conn.abandon(7)
    conn.receive_data(encode_frame(Event(id=7, seq=0)) + encode_frame(Event(id=7, seq=5)))
    with pytest.raises(RemoteProtocolError, match="expected 1"):
        conn.next_event()
    assert conn.late_frames == 1


def test_forget_all() -> None:
    conn = parent_in_state(CallState.RUNNING)
    conn.send(Call(id=8, method="m"))
    conn.abandon(8)
    assert sorted(conn.forget_all()) == [7, 8]
    assert conn.pending_calls == 0
    conn.send(Call(id=8, method="m"))
    conn.receive_data(encode_frame(Ack(id=8)))
    assert drain(conn) == [Ack(id=8)]  # no longer abandoned


def test_child_rejects_a_duplicate_pending_call_id() -> None:
    conn = Connection(Role.CHILD)
    conn.receive_data(encode_frame(Call(id=1, method="m")) + encode_frame(Call(id=1, method="m")))
    assert conn.next_event() == Call(id=1, method="m")
    with pytest.raises(RemoteProtocolError, match="already pending"):
        conn.next_event()


# -- local protocol errors ---------------------------------------------------------------------------


def test_child_must_send_hello_first() -> None:
    conn = Connection(Role.CHILD)
    conn.receive_data(encode_frame(Call(id=1, method="m")))
    one(conn)
    for message in (Ack(id=1), Pong(nonce=1), Error(id=1, code="internal")):
        with pytest.raises(LocalProtocolError, match="first frame must be hello"):
            conn.send(message)
    conn.send(HELLO)
    conn.send(Ack(id=1))
    with pytest.raises(LocalProtocolError, match="second hello"):
        conn.send(HELLO)


@pytest.mark.parametrize("kind", REPLY_KINDS, ids=lambda kind: kind.__name__)
def test_child_sending_for_a_non_pending_id(kind: type) -> None:
    conn = child_in_state(CallState.RUNNING)
    with pytest.raises(LocalProtocolError, match="which is not pending"):
        conn.send(call_frame(kind, 99))
    assert conn.call_state(7) is CallState.RUNNING


@pytest.mark.parametrize("message", [Call(id=1, method="m"), Cancel(id=1), Ping(nonce=1), Shutdown(grace=1)])
def test_child_cannot_send_parent_kinds(message: Any) -> None:
    conn = Connection(Role.CHILD)
    conn.send(HELLO)
    with pytest.raises(LocalProtocolError, match="child cannot send"):
        conn.send(message)


@pytest.mark.parametrize("message", [HELLO, Ack(id=1), Event(id=1, seq=0), Result(id=1), Pong(nonce=1)])
def test_parent_cannot_send_child_kinds(message: Any) -> None:
    conn = parent_after_hello()
    conn.send(Call(id=1, method="m"))
    with pytest.raises(LocalProtocolError, match="parent cannot send"):
        conn.send(message)
    assert conn.call_state(1) is CallState.AWAITING_ACK


def test_duplicate_call_id_on_send() -> None:
    conn = parent_in_state(CallState.RUNNING)
    with pytest.raises(LocalProtocolError, match="already pending"):
        conn.send(Call(id=7, method="m"))
    assert conn.call_state(7) is CallState.RUNNING
    conn.receive_data(encode_frame(Result(id=7)))
    one(conn)
    conn.send(Call(id=7, method="m"))  # finished: the id can be reused
    assert conn.call_state(7) is CallState.AWAITING_ACK


class Opaque:
    pass


cyclic: list[Any] = []
cyclic.append(cyclic)

UNENCODABLE = [object(), {"k": Opaque()}, [1, 2j], 2**64, -(2**63) - 1, cyclic, {"nested": [[cyclic]]}]
UNENCODABLE_IDS = ["object", "custom-class", "complex", "too-big", "too-small", "cyclic", "nested-cyclic"]


@pytest.mark.parametrize("params", UNENCODABLE, ids=UNENCODABLE_IDS)
def test_unencodable_params_leave_the_parent_unchanged(params: Any) -> None:
    conn = parent_after_hello()
    with pytest.raises(UnencodableMessage) as info:
        conn.send(Call(id=1, method="m", params=params))
    assert isinstance(info.value, LocalProtocolError)
    assert conn.pending_calls == 0
    assert conn.call_state(1) is CallState.DONE
    frame = conn.send(Call(id=1, method="m", params=[1, 2]))  # the id can be reused
    assert conn.call_state(1) is CallState.AWAITING_ACK
    assert decode_frames_untrusted(frame, Role.CHILD) == [Call(id=1, method="m", params=[1, 2])]


@pytest.mark.parametrize("value", UNENCODABLE, ids=UNENCODABLE_IDS)
def test_unencodable_result_leaves_the_child_unchanged(value: Any) -> None:
    conn = child_in_state(CallState.RUNNING)
    with pytest.raises(UnencodableMessage):
        conn.send(Result(id=7, value=value))
    assert conn.call_state(7) is CallState.RUNNING
    conn.send(Error(id=7, code=ErrorCode.UNENCODABLE, type="TypeError", message="cannot encode"))
    assert conn.call_state(7) is CallState.DONE


def test_unencodable_without_state_checks() -> None:
    with pytest.raises(UnencodableMessage):
        encode_frame(Call(id=1, method="m", params={1: object()}))
    with pytest.raises(UnencodableMessage):
        Connection(Role.PARENT, check_states=False).send(Call(id=1, method="m", params=cyclic))


# -- purity ------------------------------------------------------------------------------------------


def test_importing_wire_imports_neither_trio_nor_dspy() -> None:
    code = (
        "import sys, bridge_child.wire\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in {'trio', 'dspy', 'litellm'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout


def test_an_untraced_call_is_encoded_as_before_and_a_traced_one_is_its_own_kind() -> None:
    # the frame of a plain call is byte for byte what it was before tracing existed
    assert encode_frame(Call(id=1, method="m")).hex() == "d5010000000c96a463616c6c01a16dc0c000"
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    traced = TracedCall(id=1, method="m", trace=traceparent)
    assert decode_frames_untrusted(encode_frame(traced), Role.CHILD) == [traced]
    assert isinstance(traced, Call)  # the child serves it as any call
    pair = ConnectionPair.connected()
    assert pair.to_child(traced) == traced
    with pytest.raises(LocalProtocolError, match="already pending"):
        pair.parent.send(Call(id=1, method="m"))
