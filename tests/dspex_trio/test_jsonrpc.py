"""JSON-RPC 2.0 for the websocket API (``_jsonrpc.py``), sans-IO: parsing, params, replies."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspex_trio import _jsonrpc as rpc


def parse_error(text: str) -> rpc.RpcError:
    with pytest.raises(rpc.RpcError) as caught:
        rpc.parse_message_untrusted(text)
    return caught.value


def test_a_request_and_a_notification() -> None:
    request = rpc.parse_message_untrusted('{"jsonrpc": "2.0", "id": 7, "method": "ping"}')
    assert request == rpc.Request(method="ping", params={}, id=7, has_id=True)
    notification = rpc.parse_message_untrusted('{"jsonrpc": "2.0", "method": "x", "params": {"a": 1}}')
    assert notification.has_id is False and notification.params == {"a": 1}
    assert rpc.parse_message_untrusted('{"jsonrpc":"2.0","id":"a","method":"m","params":null}').params == {}


@pytest.mark.parametrize(
    ("text", "code", "request_id"),
    [
        ("{oops", rpc.PARSE_ERROR, None),
        ('{"jsonrpc": "2.0", "id": 1, "method": "m", "params": {"x": NaN}}', rpc.PARSE_ERROR, None),
        ('{"jsonrpc": "2.0", "id": 1, "method": "m", "params": {"x": Infinity}}', rpc.PARSE_ERROR, None),
        ("-Infinity", rpc.PARSE_ERROR, None),
        ("[" * 100_000, rpc.PARSE_ERROR, None),  # deep nesting: a parse error, never a RecursionError
        ('[{"jsonrpc": "2.0", "id": 1, "method": "m"}]', rpc.INVALID_REQUEST, None),
        ("5", rpc.INVALID_REQUEST, None),
        ('{"jsonrpc": "1.0", "id": 3, "method": "m"}', rpc.INVALID_REQUEST, 3),
        ('{"jsonrpc": "2.0", "id": 3}', rpc.INVALID_REQUEST, 3),
        ('{"jsonrpc": "2.0", "id": 3, "method": ""}', rpc.INVALID_REQUEST, 3),
        ('{"jsonrpc": "2.0", "id": 3, "method": "m", "params": [1]}', rpc.INVALID_REQUEST, 3),
        ('{"jsonrpc": "2.0", "id": 3, "method": "m", "extra": 1}', rpc.INVALID_REQUEST, 3),
        ('{"jsonrpc": "2.0", "id": true, "method": "m"}', rpc.INVALID_REQUEST, None),
        ('{"jsonrpc": "2.0", "id": [1], "method": "m"}', rpc.INVALID_REQUEST, None),
        ('{"jsonrpc": "2.0", "id": null, "method": "m"}', rpc.INVALID_REQUEST, None),
        ('{"jsonrpc": "2.0", "id": "' + "x" * 129 + '", "method": "m"}', rpc.INVALID_REQUEST, None),
    ],
)
def test_bad_messages_get_their_code_and_the_id_when_readable(text: str, code: int, request_id: Any) -> None:
    error = parse_error(text)
    assert error.code == code and error.data["kind"] == rpc.KINDS[code]
    assert getattr(error, "request_id", None) == request_id


def test_params_are_structured_strictly_with_every_problem_named() -> None:
    with pytest.raises(rpc.RpcError) as caught:
        rpc.structure_params_untrusted({"program": 5, "stream": "yes", "extra": 1}, rpc.ExecutionParams)
    assert caught.value.code == rpc.INVALID_PARAMS
    assert set(caught.value.data["errors"]) == {
        "program: expected a string, got int",
        "inputs: required",
        "stream: expected a boolean, got str",
        "unknown parameter: extra",
    }
    params = rpc.structure_params_untrusted(
        {"program": "p", "inputs": {"q": 1}, "timeout": 2}, rpc.ExecutionParams
    )
    assert params.timeout == 2.0 and params.stream is True and params.session is None


@pytest.mark.parametrize(
    ("params", "cls", "fragment"),
    [
        ({"program": "p", "inputs": {}, "timeout": -1}, rpc.ExecutionParams, "timeout"),
        ({"program": "p", "inputs": {}, "timeout": True}, rpc.ExecutionParams, "timeout"),
        ({"program": "x" * 129, "inputs": {}}, rpc.ExecutionParams, "program: at most 128"),
        ({"program": "p", "inputs": {}, "session": "s" * 129}, rpc.ExecutionParams, "session: at most 128"),
        ({"session": "s" * 129}, rpc.SessionEndParams, "session: at most 128"),
        ({"model": "m", "api_key": "k" * 5000}, rpc.LmConfigureParams, "api_key"),
        ({"model": "m", "default": "yes"}, rpc.LmConfigureParams, "default"),
        ({"name": 3}, rpc.LmSelectParams, "name"),
        ({"signature": 5}, rpc.ProgramCreateParams, "signature"),
    ],
)
def test_bad_params(params: dict[str, Any], cls: type, fragment: str) -> None:
    with pytest.raises(rpc.RpcError) as caught:
        rpc.structure_params_untrusted(params, cls)
    assert fragment in caught.value.message


def test_replies_and_encoding() -> None:
    assert rpc.result_reply(1, {"a": 1}) == {"jsonrpc": "2.0", "id": 1, "result": {"a": 1}}
    error = rpc.RpcError(rpc.LIMIT_EXCEEDED, "too many", data={"limit": "x", "max": 2})
    assert rpc.error_reply("r", error) == {
        "jsonrpc": "2.0",
        "id": "r",
        "error": {
            "code": -32004,
            "message": "too many",
            "data": {"kind": "limit_exceeded", "limit": "x", "max": 2},
        },
    }
    assert rpc.notification("m", {"x": 1}) == {"jsonrpc": "2.0", "method": "m", "params": {"x": 1}}
    assert json.loads(rpc.encode({"s": {1}, "é": "ü"})) == {"s": "{1}", "é": "ü"}


def test_every_code_has_a_distinct_stable_kind() -> None:
    assert len(set(rpc.KINDS.values())) == len(rpc.KINDS)
    assert rpc.KINDS[rpc.SESSION_NOT_FOUND] == "session_not_found"
    assert rpc.KINDS[rpc.UNAUTHORIZED] == "unauthorized"


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_an_rpc_error(text: str) -> None:
    try:
        request = rpc.parse_message_untrusted(text)
    except rpc.RpcError as exc:
        assert exc.code in (rpc.PARSE_ERROR, rpc.INVALID_REQUEST)
    else:
        assert isinstance(request.method, str) and isinstance(request.params, dict)
