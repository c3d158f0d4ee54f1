"""Tests of the wire protocol's LM leases (``LeaseRequest`` / ``LeaseGrant`` / ``LeaseRelease`` and
``LEASE_TRANSITIONS``), in the manner of ``test_wire``: the table over every state and frame, both
ends agreeing on fuzzed lease conversations, the dropped answer of an abandoned lease, the bound.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_child import wire
from bridge_child.wire import (
    LEASE_KINDS,
    LEASE_TRANSITIONS,
    Call,
    Connection,
    LeaseGrant,
    LeaseRelease,
    LeaseRequest,
    LeaseState,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    encode_frame,
    lm_key,
)
from tests.bridge_child.test_wire import (
    FUZZ,
    HELLO,
    SENDER,
    SIDES,
    ConnectionPair,
    apply_as,
    drain,
    meet,
    one,
)
from tests.tables import CASE_NAMES, every_state_and_input, path_to


def lease_frame(kind: type, lease: int = 7) -> Any:
    if kind is LeaseRequest:
        return LeaseRequest(lease=lease, call=1, lm="openai/x @ http://127.0.0.1:1/v1", tokens=12)
    if kind is LeaseGrant:
        return LeaseGrant(lease=lease)
    return LeaseRelease(lease=lease, status=429, retry_after=2.0, tokens=30)


def conn_with_lease(role: Role, state: LeaseState, lease: int = 7) -> Connection:
    conn = Connection(role)
    meet(conn, HELLO)
    for kind in path_to(LEASE_TRANSITIONS, LeaseState.FREE, state):
        message = lease_frame(kind, lease)
        if SENDER[kind] is role:
            conn.send(message)
        else:
            conn.receive_data(encode_frame(message))
            drain(conn)  # the answer of an abandoned lease is dropped
    assert conn.lease_state(lease) is state
    return conn


def test_the_lease_table_shape() -> None:
    assert {kind for _, kind in LEASE_TRANSITIONS} == LEASE_KINDS
    assert [state for state, kind in LEASE_TRANSITIONS if kind is LeaseRequest] == [LeaseState.FREE]
    # Every request is answered once and released once, in either order.
    assert LEASE_TRANSITIONS[LeaseState.REQUESTED, LeaseGrant] is LeaseState.GRANTED
    assert LEASE_TRANSITIONS[LeaseState.GRANTED, LeaseRelease] is LeaseState.FREE
    assert LEASE_TRANSITIONS[LeaseState.REQUESTED, LeaseRelease] is LeaseState.ABANDONED
    assert LEASE_TRANSITIONS[LeaseState.ABANDONED, LeaseGrant] is LeaseState.FREE
    assert wire.LEASE_KINDS.isdisjoint(wire.CALL_KINDS)


@pytest.mark.parametrize(CASE_NAMES, every_state_and_input(LEASE_TRANSITIONS, LeaseState, LEASE_KINDS))
@pytest.mark.parametrize("side", SIDES)
def test_every_lease_state_and_frame(
    side: str, state: LeaseState, event: type, expected: LeaseState | None
) -> None:
    message = lease_frame(event)
    role, refusal = apply_as(side, message)
    conn = conn_with_lease(role, state)
    if expected is None:
        with pytest.raises(refusal, match=f"lease 7 in state {state.value}"):
            meet(conn, message)
        if refusal is LocalProtocolError:
            assert conn.lease_state(7) is state  # unchanged
        return
    if side == "received" and event is LeaseGrant and state is LeaseState.ABANDONED:
        conn.receive_data(encode_frame(message))
        assert drain(conn) == []  # the child stopped waiting: dropped, counted
        assert conn.late_frames == 1
    else:
        meet(conn, message)
    assert conn.lease_state(7) is expected
    assert conn.pending_leases == (expected is not LeaseState.FREE)


def test_a_lease_before_the_hello_is_refused() -> None:
    parent = Connection(Role.PARENT)
    parent.receive_data(encode_frame(lease_frame(LeaseRequest)))
    with pytest.raises(RemoteProtocolError, match="hello"):
        parent.next_event()
    child = Connection(Role.CHILD)
    with pytest.raises(LocalProtocolError, match="hello"):
        child.send(lease_frame(LeaseRequest))


def test_a_full_lease_between_both_ends() -> None:
    pair = ConnectionPair.connected()
    pair.to_child(Call(id=1, method="execute"))
    request = lease_frame(LeaseRequest, 1)
    assert pair.to_parent(request) == [request]
    assert pair.to_child(LeaseGrant(lease=1)) == LeaseGrant(lease=1)
    release = lease_frame(LeaseRelease, 1)
    assert pair.to_parent(release) == [release]
    assert pair.parent.pending_leases == pair.child.pending_leases == 0
    # The id is free again; a refused grant is an answer like any other.
    assert pair.to_parent(request) == [request]
    refused = LeaseGrant(lease=1, ok=False, reason="budget")
    assert pair.to_child(refused) == refused
    assert pair.to_parent(LeaseRelease(lease=1)) == [LeaseRelease(lease=1)]
    assert pair.parent.late_frames == pair.child.late_frames == 0


def test_a_release_that_crosses_the_grant() -> None:
    pair = ConnectionPair.connected()
    pair.to_parent(lease_frame(LeaseRequest, 3))
    grant = pair.parent.send(LeaseGrant(lease=3))  # on its way while the child gives up
    pair.parent.receive_data(pair.child.send(LeaseRelease(lease=3)))
    assert one(pair.parent) == LeaseRelease(lease=3)
    assert pair.child.lease_state(3) is LeaseState.ABANDONED
    assert pair.parent.lease_state(3) is LeaseState.FREE
    pair.child.receive_data(grant)
    assert drain(pair.child) == []
    assert pair.child.late_frames == 1 and pair.child.pending_leases == 0


def test_the_parent_answers_a_lease_released_before_its_answer() -> None:
    pair = ConnectionPair.connected()
    pair.to_parent(lease_frame(LeaseRequest, 4))
    assert pair.to_parent(LeaseRelease(lease=4)) == [LeaseRelease(lease=4)]
    assert pair.parent.lease_state(4) is LeaseState.ABANDONED
    pair.child.receive_data(pair.parent.send(LeaseGrant(lease=4, ok=False, reason="released")))
    assert drain(pair.child) == []
    assert pair.parent.pending_leases == pair.child.pending_leases == 0


def test_pending_leases_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_PENDING_LEASES", 3)
    pair = ConnectionPair.connected()
    for lease in range(3):
        pair.to_parent(lease_frame(LeaseRequest, lease))
    with pytest.raises(LocalProtocolError, match="more than 3 leases"):
        pair.child.send(lease_frame(LeaseRequest, 99))
    pair.parent.receive_data(encode_frame(lease_frame(LeaseRequest, 99)))
    with pytest.raises(RemoteProtocolError, match="more than 3 leases"):
        pair.parent.next_event()


def test_forget_all_drops_leases() -> None:
    pair = ConnectionPair.connected()
    pair.to_parent(lease_frame(LeaseRequest, 1))
    assert pair.parent.forget_all() == []
    assert pair.parent.pending_leases == 0


def test_old_frames_are_unchanged_and_new_ones_have_their_tags() -> None:
    # The lease kinds are new tags; the frames that existed before keep their bytes.
    assert encode_frame(wire.Ping(nonce=1)) == bytes.fromhex("d50100000007") + b"\x92\xa4ping\x01"
    assert encode_frame(LeaseGrant(lease=1)) == bytes.fromhex("d5010000000a") + b"\x94\xa5grant\x01\xc3\xa0"


def test_lm_key() -> None:
    assert lm_key("openai/gpt-4o-mini") == "openai/gpt-4o-mini"
    assert (
        lm_key("openai/x", "http://h:1/v1/")
        == lm_key("openai/x", "http://h:1/v1")
        == "openai/x @ http://h:1/v1"
    )
    assert lm_key("openai/x", "http://a/v1") != lm_key("openai/x", "http://b/v1")


lease_ids = st.integers(1, 2)


@st.composite
def lease_conversations(draw: st.DrawFn) -> list[Any]:
    """Valid lease lives for leases 1 and 2 (request, then grant and release in either order, possibly
    twice), interleaved, then sometimes one mistake: a frame dropped, repeated, or a stray one."""
    lives: list[list[Any]] = []
    for lease in (1, 2):
        frames: list[Any] = []
        for _ in range(draw(st.integers(0, 2))):
            frames.append(lease_frame(LeaseRequest, lease))
            answer = LeaseGrant(lease=lease, ok=draw(st.booleans()))
            release = LeaseRelease(lease=lease, status=draw(st.sampled_from([0, 200, 429, 500])))
            frames += [answer, release] if draw(st.booleans()) else [release, answer]
        lives.append(frames)
    conversation: list[Any] = [HELLO]
    while any(lives):
        life = draw(st.sampled_from([life for life in lives if life]))
        conversation.append(life.pop(0))
    mistake = draw(st.sampled_from(["none", "drop", "repeat", "stray"]))
    at = draw(st.integers(1, len(conversation)))
    if mistake == "drop" and at < len(conversation):
        del conversation[at]
    elif mistake == "repeat" and at < len(conversation):
        conversation.insert(at, conversation[at])
    elif mistake == "stray":
        kind = draw(st.sampled_from(sorted(LEASE_KINDS, key=lambda k: k.__name__)))
        conversation.insert(at, lease_frame(kind, draw(lease_ids)))
    return conversation


@FUZZ
@given(frames=lease_conversations())
def test_both_ends_agree_on_every_lease_frame(frames: list[Any]) -> None:
    # In these conversations every frame is delivered before the next is sent, so a release before
    # the grant is seen by both ends alike, and an answer to an abandoned lease is dropped by the child.
    pair = ConnectionPair()
    for message in frames:
        parent_sends = type(message) in wire.PARENT_KINDS
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
        delivered = drain(receiver)
        assert delivered in ([message], [])
        if not delivered:
            assert type(message) is LeaseGrant and receiver is pair.child
        assert [pair.parent.lease_state(i) for i in (1, 2)] == [pair.child.lease_state(i) for i in (1, 2)]
    assert pair.parent.pending_leases == pair.child.pending_leases
