"""JSON-RPC 2.0 for the websocket API, sans-IO: text in, a request or an error reply out.

No trio, no sockets: :func:`parse_message_untrusted` turns one client text frame into a :class:`Request`
or a :class:`RpcError`; :func:`structure_params_untrusted` validates a method's params with a strict
cattrs converter (no silent coercion: ``5`` is not a string) and reports every problem at once, as the
``data.errors`` of a ``-32602`` reply. The reply builders return plain dicts; :func:`encode` makes text.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final, TypeVar

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from bridge_child.spec import LM_CACHE_MODES

# -- error codes: standard JSON-RPC, then the server range (-32000 .. -32099) --------------------------

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
OVERLOADED: Final = -32000
UNAVAILABLE: Final = -32001
UNKNOWN_EXECUTION: Final = -32002
UNKNOWN_PROGRAM: Final = -32003
LIMIT_EXCEEDED: Final = -32004
UNAUTHORIZED: Final = -32005
SESSION_NOT_FOUND: Final = -32006
EXECUTION_FAILED: Final = -32010

KINDS: Final[dict[int, str]] = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal",
    OVERLOADED: "overloaded",
    UNAVAILABLE: "unavailable",
    UNKNOWN_EXECUTION: "unknown_execution",
    UNKNOWN_PROGRAM: "unknown_program",
    LIMIT_EXCEEDED: "limit_exceeded",
    UNAUTHORIZED: "unauthorized",
    SESSION_NOT_FOUND: "session_not_found",
    EXECUTION_FAILED: "execution_failed",
}
"""Every error reply carries ``data.kind``: this name of its code (stable across versions)."""

MAX_ID_CHARS: Final = 128
"""Longest string request id accepted, in characters."""
MAX_NAME_CHARS: Final = 128
"""Longest session, program, execution, subscription or LM name accepted in params, in characters."""

RequestId = str | int | float | None


@attrs.frozen
class Request:
    """One valid request (or notification, when ``has_id`` is False: it gets no reply)."""

    method: str
    params: dict[str, Any]
    id: RequestId = None
    has_id: bool = True


class RpcError(Exception):
    """A JSON-RPC error reply to send (``id`` is None when the request's id could not be read)."""

    def __init__(self, code: int, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = {"kind": KINDS.get(code, "error"), **(data or {})}


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decode: Final = json.JSONDecoder(parse_constant=_refuse_constant).decode
"""``json.loads`` that refuses ``NaN`` and ``Infinity`` (one decoder: ``loads`` with a keyword makes one
per call)."""


def parse_message_untrusted(text: str) -> Request:
    """Parse one text frame from a client.

    Raises:
        RpcError: ``PARSE_ERROR`` (not JSON), or ``INVALID_REQUEST`` (not a JSON-RPC 2.0 request object;
            batches are not supported). ``error.request_id`` is the id when it could be read.
    """
    try:
        message = _decode(text)
    except (ValueError, RecursionError) as exc:
        raise RpcError(PARSE_ERROR, f"invalid JSON: {exc}") from None
    if isinstance(message, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported; send one request per frame")
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object")
    has_id = "id" in message
    request_id = message.get("id")
    if has_id and not _valid_id(request_id):
        raise RpcError(INVALID_REQUEST, "id must be a string (at most 128 characters) or a finite number")
    try:
        if message.get("jsonrpc") != "2.0":
            raise RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"')
        method = message.get("method")
        if not isinstance(method, str) or not method:
            raise RpcError(INVALID_REQUEST, "method must be a non-empty string")
        params = message.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise RpcError(INVALID_REQUEST, "params must be an object (by-name parameters)")
        extra = set(message) - {"jsonrpc", "method", "params", "id"}
        if extra:
            raise RpcError(INVALID_REQUEST, f"unknown member(s): {', '.join(sorted(extra))}")
    except RpcError as exc:
        exc.request_id = request_id  # type: ignore[attr-defined]
        raise
    return Request(method=method, params=params, id=request_id, has_id=has_id)


# -- replies ---------------------------------------------------------------------------------------------


def result_reply(request_id: RequestId, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_reply(request_id: RequestId, error: RpcError) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": error.code, "message": error.message, "data": error.data},
    }


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


_encode: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode
"""``json.dumps`` with :func:`encode`'s options, made once (``dumps`` with keywords makes one per call)."""


def encode(message: dict[str, Any]) -> str:
    """Compact JSON text; values that JSON lacks (enums, sets, ...) are written as strings."""
    return _encode(message)


# -- params ------------------------------------------------------------------------------------------------


def _name(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{attribute.name}: at most {MAX_NAME_CHARS} characters")


def _name_field() -> Any:
    return attrs.field(default=None, validator=_name)


@attrs.frozen(kw_only=True)
class ProgramCreateParams:
    signature: str | dict[str, Any] | None = None
    """A built-in's signature; none for a registered program (``module`` names it)."""
    module: str = attrs.field(default="predict", validator=_name)
    instructions: str | None = None
    session: str | None = _name_field()
    state: dict[str, Any] | None = None
    include: list[str] | None = None
    tools: list[str] | None = None
    max_iters: int | None = None
    n: int | None = None
    reward: str | None = _name_field()
    threshold: float | None = None
    base: str | None = _name_field()

    def options(self) -> dict[str, Any]:
        """The module options given (``tools``, ``max_iters``, ``n``, ``reward``, ``threshold``, ``base``)."""
        names = ("tools", "max_iters", "n", "reward", "threshold", "base")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@attrs.frozen(kw_only=True)
class ProgramRefParams:
    program: str = attrs.field(validator=_name)
    session: str | None = _name_field()


@attrs.frozen(kw_only=True)
class SessionParams:
    session: str | None = _name_field()


@attrs.frozen(kw_only=True)
class SessionEndParams:
    session: str = attrs.field(validator=_name)


@attrs.frozen(kw_only=True)
class LmConfigureParams:
    model: str = attrs.field(validator=_name)
    session: str | None = _name_field()
    api_base: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.max_len(2048))
    )
    api_key: str | None = attrs.field(
        default=None, repr=False, validator=attrs.validators.optional(attrs.validators.max_len(4096))
    )
    settings: dict[str, Any] = attrs.field(factory=dict)
    """Further ``dspy.LM`` settings (``temperature``, ``max_tokens``, ``num_retries``, ``timeout``)."""
    default: bool = False
    """Change the server's default LM instead of a session's (admin connections only)."""


@attrs.frozen(kw_only=True)
class LmSelectParams:
    name: str = attrs.field(validator=_name)
    session: str | None = _name_field()


def _lm_cache_mode(instance: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and value not in LM_CACHE_MODES:
        shown = str(value)[:64]
        raise ValueError(
            f"{attribute.name} must be one of {', '.join(LM_CACHE_MODES)} or null, not {shown!r}"
        )


@attrs.frozen(kw_only=True)
class ExecutionParams:
    program: str = attrs.field(validator=_name)
    inputs: dict[str, Any]
    session: str | None = _name_field()
    stream: bool = True
    """``execution/submit`` only: send ``chunk`` events as the LM streams."""
    timeout: float | None = None
    """Seconds for the whole execution (queueing included); None: the server's maximum."""
    lm_cache: str | None = attrs.field(default=None, validator=_lm_cache_mode)
    """This execution's LM cache mode (``read_write``, ``read_only``, ``off``); None: its session's."""

    def __attrs_post_init__(self) -> None:
        if self.timeout is not None and not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a finite number of seconds > 0, not {self.timeout!r}")


@attrs.frozen(kw_only=True)
class ExecutionCancelParams:
    execution: str = attrs.field(validator=_name)


@attrs.frozen(kw_only=True)
class SubscriptionParams:
    subscription: str = attrs.field(validator=_name)


@attrs.frozen(kw_only=True)
class NoParams:
    pass


def _strict(expected: type, name: str) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and expected is not bool:
            raise TypeError(f"expected {name}, got a boolean")
        if not isinstance(value, expected):
            raise TypeError(f"expected {name}, got {type(value).__name__}")
        return value

    return hook


def _number(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _object(value: Any, _type: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _signature(value: Any, _type: Any) -> str | dict[str, Any]:
    if isinstance(value, str | dict):
        return value
    raise TypeError(f"expected a string or an object, got {type(value).__name__}")


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(bool, _strict(bool, "a boolean"))
    converter.register_structure_hook(int, _strict(int, "an integer"))
    converter.register_structure_hook(float, _number)
    converter.register_structure_hook_func(lambda t: t == dict[str, Any], _object)
    converter.register_structure_hook_func(lambda t: t == str | dict[str, Any], _signature)
    converter.register_structure_hook_func(
        lambda t: t == str | dict[str, Any] | None, lambda v, t: None if v is None else _signature(v, t)
    )
    return converter


_converter = _make_converter()
T = TypeVar("T")


def structure_params_untrusted(params: dict[str, Any], cls: type[T]) -> T:
    """Validate a method's params into ``cls``.

    Raises:
        RpcError: ``INVALID_PARAMS``, with ``data.errors``: one readable line per problem, each naming its
            parameter (``"inputs: expected an object, got str"``, ``"unknown parameter: foo"``).
    """
    try:
        return _converter.structure(params, cls)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError, TypeError) as exc:
        errors = _describe(exc)
        raise RpcError(
            INVALID_PARAMS, "invalid params: " + "; ".join(errors), data={"errors": errors}
        ) from None


def _describe(exc: BaseException) -> list[str]:
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"unknown parameter: {key}" for key in sorted(exc.extra_fields)]
    if isinstance(exc, ClassValidationError):
        lines: list[str] = []
        with_notes, without = exc.group_exceptions()
        for inner, note in with_notes:
            name = getattr(note, "name", None)
            if isinstance(inner, KeyError):
                lines.append(f"{name}: required")
            else:
                lines.append(f"{name}: {inner}" if name else str(inner))
        for inner in without:
            lines.extend(_describe(inner))
        return lines or [str(exc)]
    return [str(exc)]
