"""The remote client's sans-IO layer (``_client_protocol.py``): what a server sends, checked and mapped
to the in-process API's errors, with no socket."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dspex_trio
from dspex_trio import _jsonrpc as rpc
from dspex_trio._client_lm import LMPolicyRefused
from dspex_trio._client_protocol import (
    EXECUTION_RULES,
    ExecutionState,
    ExecutionTrack,
    Notification,
    RemoteProtocolError,
    Reply,
    apply_health_event,
    error_from_failure_untrusted,
    error_from_reply_untrusted,
    health_snapshot_untrusted,
    parse_server_message_untrusted,
)
from dspex_trio._mock import MockBackend
from dspex_trio._ws_errors import failure, rpc_error_from


def test_replies_and_notifications_parse() -> None:
    assert parse_server_message_untrusted('{"jsonrpc":"2.0","id":3,"result":{"a":1}}') == Reply(
        3, {"a": 1}, None
    )
    assert parse_server_message_untrusted('{"jsonrpc":"2.0","id":4,"result":null}') == Reply(4, None, None)
    error = {"code": -32003, "message": "no", "data": {"kind": "unknown_program"}}
    assert parse_server_message_untrusted(json.dumps({"jsonrpc": "2.0", "id": 5, "error": error})) == Reply(
        5, None, error
    )
    note = parse_server_message_untrusted('{"jsonrpc":"2.0","method":"execution/event","params":{"x":1}}')
    assert note == Notification("execution/event", {"x": 1})


@pytest.mark.parametrize(
    "text",
    [
        b'{"jsonrpc":"2.0","id":1,"result":1}',  # a binary frame
        "{oops",
        "NaN",
        '{"jsonrpc":"2.0","id":1,"result":NaN}',
        "[]",
        '{"id":1,"result":1}',  # no jsonrpc
        '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x","data":{}}}',  # id null
        '{"jsonrpc":"2.0","id":"1","result":1}',  # we send integer ids only
        '{"jsonrpc":"2.0","id":true,"result":1}',
        '{"jsonrpc":"2.0","id":1}',  # neither result nor error
        '{"jsonrpc":"2.0","id":1,"result":1,"error":{"code":1,"message":"m"}}',  # both
        '{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}',
        '{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m","data":[]}}',
        '{"jsonrpc":"2.0","method":"x","params":[]}',
        '{"jsonrpc":"2.0","method":"x","params":{},"id":7}',  # a request from the server
        '{"jsonrpc":"2.0","method":5,"params":{}}',
        "[" * 100_000,
    ],
)
def test_anything_else_is_a_remote_protocol_error(text: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_server_message_untrusted(text)


@given(st.one_of(st.text(max_size=200), st.binary(max_size=50)))
def test_fuzz_any_frame_parses_or_is_a_remote_protocol_error(text: Any) -> None:
    try:
        parse_server_message_untrusted(text)
    except RemoteProtocolError:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    )
)
def test_fuzz_any_json_value_parses_or_is_a_remote_protocol_error(value: Any) -> None:
    try:
        parse_server_message_untrusted(json.dumps(value))
    except RemoteProtocolError:
        pass


# -- errors ----------------------------------------------------------------------------------------------

ROUND_TRIP = [
    dspex_trio.Overloaded("admission is full"),
    dspex_trio.PoolUnavailable("circuit open", reason="restart storm"),
    dspex_trio.ProgramNotFound("no program 'p_1'"),
    dspex_trio.SessionNotFound("no session"),
    dspex_trio.LimitExceeded("too many", limit="programs", max=256),
    dspex_trio.InvalidParams("execute: missing input field(s) 'context'"),
    LMPolicyRefused("clients may not configure LMs"),
    dspex_trio.CallTimeout("deadline passed"),
    dspex_trio.ProgramError("the LM refused", error_type="LMRateLimitError"),
    dspex_trio.WorkerCrashed("worker died"),
    dspex_trio.WorkerUnresponsive("no heartbeat"),
    dspex_trio.WorkerClosed("closing"),
]


@pytest.mark.parametrize("exc", ROUND_TRIP, ids=lambda e: type(e).__name__)
def test_the_servers_errors_come_back_as_the_in_process_exceptions(exc: dspex_trio.DspexError) -> None:
    """What the server makes of an exception (an error reply; a ``failed`` event) maps back to the
    exception the in-process API raises (the server's own mapping, ``_ws_api``, on one side)."""
    reply = rpc.error_reply(1, rpc_error_from(exc))["error"]
    back = error_from_reply_untrusted(json.loads(json.dumps(reply)))
    expected = {dspex_trio.WorkerClosed: dspex_trio.PoolUnavailable}.get(type(exc), type(exc))
    if isinstance(exc, dspex_trio.WorkerCrashed | dspex_trio.CallTimeout | dspex_trio.ProgramError):
        expected = type(exc)  # execution_failed, named by its data.error
    assert type(back) is expected, (reply, back)

    data = failure(exc)
    assert data.get("kind") != "execution_failed"
    event = error_from_failure_untrusted(data)
    assert type(event) is type(exc)
    if isinstance(exc, dspex_trio.ProgramError):
        assert isinstance(event, dspex_trio.ProgramError)
        assert event.error_type == "LMRateLimitError" and str(event) == str(exc)  # not "T: T: ..."
    if isinstance(exc, dspex_trio.LimitExceeded):
        assert isinstance(back, dspex_trio.LimitExceeded) and (back.limit, back.max) == ("programs", 256)


def test_unknown_and_foreign_errors_stay_typed() -> None:
    assert isinstance(
        error_from_reply_untrusted({"code": -32099, "message": "m", "data": {"kind": "brand_new"}}),
        dspex_trio.WorkerError,
    )
    assert isinstance(error_from_reply_untrusted({"code": -32601, "message": "m"}), dspex_trio.UnknownMethod)
    for kind in ("parse_error", "invalid_request"):
        assert isinstance(
            error_from_reply_untrusted({"code": -32600, "message": "m", "data": {"kind": kind}}),
            RemoteProtocolError,
        )
    odd = error_from_failure_untrusted({"type": "ZeroDivisionError", "error": "Boom", "message": "x" * 9000})
    assert isinstance(odd, dspex_trio.WorkerError) and odd.error_type == "ZeroDivisionError"
    assert len(str(odd)) < 2100  # bounded


# -- one execution's events ---------------------------------------------------------------------------------


def test_the_events_of_an_execution_follow_its_table() -> None:
    track = ExecutionTrack("e_1")
    assert track.advance_untrusted(1, "started", {}) is False
    assert track.advance_untrusted(2, "chunk", {"field": "answer", "chunk": "a"}) is False
    assert track.advance_untrusted(3, "completed", {"outputs": {"answer": "a"}, "usage": None}) is True
    assert track.state is ExecutionState.ENDED
    with pytest.raises(RemoteProtocolError, match="not allowed once it is ended"):
        track.advance_untrusted(4, "chunk", {"field": "answer", "chunk": "late"})


@pytest.mark.parametrize(
    ("events", "problem"),
    [
        ([(1, "chunk", {"field": "a", "chunk": "x"})], "not allowed once it is submitted"),
        ([(2, "started", {})], "a gap or a repeat"),
        ([(1, "started", {}), (1, "completed", {"outputs": {}, "usage": None})], "a gap or a repeat"),
        ([(1, "started", {}), (3, "completed", {"outputs": {}, "usage": None})], "a gap or a repeat"),
        ([(1, "started", {}), (2, "progress", {})], "'progress' is not allowed"),
        ([(1, "started", {}), (2, "completed", {"outputs": []})], "'outputs' is missing or mistyped"),
        ([(1, "started", {}), (2, "failed", {"type": "X", "error": "Y"})], "'message' is missing"),
        ([(1, "started", {}), (2, "chunk", "text")], "data is not an object"),
        ([(True, "started", {})], "a gap or a repeat"),
        ([(1, None, {})], "is not allowed"),
    ],
)
def test_anything_out_of_the_table_is_a_remote_protocol_error(
    events: list[tuple[Any, Any, Any]], problem: str
) -> None:
    track = ExecutionTrack("e_1")
    with pytest.raises(RemoteProtocolError, match=problem):
        for seq, event, data in events:
            track.advance_untrusted(seq, event, data)


def test_every_rule_leads_from_a_state_reached_by_another() -> None:
    reachable = {ExecutionState.SUBMITTED} | set(EXECUTION_RULES.values())
    assert {state for state, _ in EXECUTION_RULES} <= reachable
    assert not any(state is ExecutionState.ENDED for state, _ in EXECUTION_RULES)  # terminal is final


# -- health ------------------------------------------------------------------------------------------------


def test_a_snapshot_round_trips_and_events_patch_it() -> None:
    snapshot = MockBackend().health()
    assert health_snapshot_untrusted(snapshot.to_json()) == snapshot
    worker = {"worker_id": "w1", "pid": 10, "from": "starting", "to": "ready", "reason": ""}
    patched = apply_health_event(snapshot, "worker_state", worker)
    assert [(w.worker_id, w.pid, w.state) for w in patched.workers] == [("w1", 10, "ready")]
    busy = apply_health_event(patched, "worker_state", {**worker, "from": "ready", "to": "busy"})
    assert [w.state for w in busy.workers] == ["busy"]
    assert apply_health_event(busy, "worker_state", {**worker, "to": "failed"}).workers == ()
    opened = apply_health_event(busy, "circuit", {"from": "closed", "to": "open", "reason": "storm"})
    assert (opened.circuit, opened.circuit_reason) == ("open", "storm")
    assert apply_health_event(busy, "worker_state", {"to": "nonsense"}) == busy  # ignored, not guessed
    with pytest.raises(RemoteProtocolError):
        health_snapshot_untrusted({**snapshot.to_json(), "circuit": "ajar"})
    with pytest.raises(RemoteProtocolError):
        health_snapshot_untrusted({**snapshot.to_json(), "workers": [{"worker_id": 1}]})
