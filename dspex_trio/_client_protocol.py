"""The remote client's side of the websocket API (``dspex.v1``), sans-IO: what a server sends, checked.

No trio, no sockets. :func:`parse_server_message_untrusted` turns one text frame from a server into a
:class:`Reply` or a :class:`Notification`, or raises :class:`RemoteProtocolError`;
:func:`error_from_reply_untrusted` and :func:`error_from_failure_untrusted` map the server's errors (its
``data.kind``, a ``failed`` event's ``error`` and ``type``) to the exceptions the in-process API raises;
:class:`ExecutionTrack` follows the events of one execution through the one table of their rules
(``EXECUTION_RULES``). The I/O around it is :mod:`dspex_trio._client`.

Everything a server sends is untrusted: a frame that is not one of the messages of ``docs/websocket-api.md``
(malformed JSON, a reply to an id never sent, an event out of order or of an unknown kind, a field of the
wrong type) is a :class:`RemoteProtocolError`, never a guess. The client then closes that connection and
fails what was in flight on it, so no answer can reach the wrong caller.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Final

import attrs
import msgspec

from dspex_trio import _jsonrpc as rpc
from dspex_trio._breaker import CircuitState
from dspex_trio._client_lm import LMPolicyRefused
from dspex_trio._errors import (
    AllLMsFailed,
    CallTimeout,
    DspexError,
    InvalidParams,
    LimitExceeded,
    Overloaded,
    PoolUnavailable,
    ProgramError,
    ProgramNotFound,
    ProtocolError,
    SessionNotFound,
    UnknownMethod,
    WorkerClosed,
    WorkerCrashed,
    WorkerError,
    WorkerStartFailed,
    WorkerUnresponsive,
)
from dspex_trio._health import HealthSnapshot, WorkerHealth
from dspex_trio._states import WorkerState

MAX_ERROR_CHARS: Final = 2000
"""Longest error text from a server kept in an exception, in characters (the server bounds it too)."""


# -- the remote client's own errors ------------------------------------------------------------------------


class RemoteProtocolError(ProtocolError):
    """The server sent something that breaks the websocket API's protocol (malformed JSON, a reply to an
    id never sent, an event of an unknown kind or out of order, ...). The client closed that connection
    (1002) and failed every call in flight on it with this error; the next call reconnects."""


class ConnectionLost(WorkerCrashed):
    """The connection to the server dropped with the call in flight (the server cancels the executions of
    a connection that is gone).

    A subclass of :class:`~dspex_trio.WorkerCrashed`, so code written against the pool handles it the
    same way. ``started`` is False when the request never left the client (it is then sent again on the
    next connection, never failed with this); ``close_code`` / ``close_reason`` are the websocket's.
    """

    def __init__(
        self, message: str, *, started: bool = True, close_code: int | None = None, close_reason: str = ""
    ) -> None:
        super().__init__(message, started=started)
        self.close_code = close_code
        self.close_reason = close_reason


class HandshakeRefused(DspexError):
    """The server refused the websocket handshake: ``status`` is its HTTP status (401 a missing or wrong
    token, 403 a ``Host`` or ``Origin`` not allowed, 400 no ``dspex.v1``, 429 / 503 too many connections
    or shutting down), ``body`` the reason it gave. 429 and 503 are retried with backoff; the others are
    not (they would fail the same way again)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"the server refused the connection: HTTP {status}" + (f": {body}" if body else ""))
        self.status = status
        self.body = body

    def __reduce__(self) -> tuple[Any, ...]:  # copy.copy() (each waiting caller raises its own)
        return (type(self), (self.status, self.body), self.__dict__)

    @property
    def transient(self) -> bool:
        """Whether trying again later may succeed (too many connections, shutting down, a 5xx)."""
        return self.status == 429 or self.status >= 500


# -- messages from the server --------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Reply:
    """A reply to one of the client's requests: ``error`` is None for a result."""

    id: int
    result: Any
    error: dict[str, Any] | None


@attrs.frozen(slots=True)
class Notification:
    """A notification (``execution/event``, ``health/event``): ``params`` is an object."""

    method: str
    params: dict[str, Any]


_decode: Final = msgspec.json.Decoder().decode
"""Strict JSON (no ``NaN``, ``Infinity``, out-of-range numbers or lone surrogates), ~5x faster than
``json.loads`` per message: the client decodes three messages per execution."""


def parse_server_message_untrusted(text: str | bytes) -> Reply | Notification:
    """Parse one frame from the server.

    Raises:
        RemoteProtocolError: not one JSON-RPC 2.0 reply (with an integer id: the client sends no other)
            or notification: a binary frame, malformed JSON, a request, a reply without an id or with
            both or neither of ``result`` and ``error``.
    """
    if not isinstance(text, str):
        raise RemoteProtocolError("the server sent a binary frame (dspex.v1 is text frames only)")
    try:
        message = _decode(text)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:  # ValueError: a lone surrogate
        raise RemoteProtocolError(f"the server sent malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        raise RemoteProtocolError("the server sent a frame that is not a JSON-RPC 2.0 object")
    method = message.get("method")
    if method is not None:
        params = message.get("params")
        if not isinstance(method, str) or not isinstance(params, dict) or "id" in message:
            raise RemoteProtocolError(
                f"the server sent a malformed notification or a request ({str(method)[:64]!r})"
            )
        return Notification(method, params)
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, int):
        # id null: the server could not read a request of ours (we send only valid ones)
        raise RemoteProtocolError(
            f"the server sent a reply with id {str(request_id)[:64]!r}, not one it was sent"
        )
    has_result, error = "result" in message, message.get("error")
    if has_result == (error is not None):
        raise RemoteProtocolError(
            f"the reply to request {request_id} has both or neither of result and error"
        )
    if error is not None and not (
        isinstance(error, dict)
        and isinstance(error.get("code"), int)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("data", {}), dict)
    ):
        raise RemoteProtocolError(f"the error reply to request {request_id} is malformed")
    return Reply(request_id, message.get("result"), error)


# -- errors: the server's kinds to the in-process exceptions -------------------------------------------------


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else ""
    return text[:MAX_ERROR_CHARS]


MAX_TRIED_LMS: Final = 16
"""Most entries of an ``AllLMsFailed``'s ``tried`` read from a server, a count (a chain has at most 9)."""


def _tried_untrusted(value: Any) -> list[dict[str, str]]:
    """The ``tried`` list of an ``AllLMsFailed`` failure: at most ``MAX_TRIED_LMS`` entries of
    ``{lm, error}`` strings (anything else is dropped)."""
    if not isinstance(value, list):
        return []
    return [
        {"lm": _text(item.get("lm")), "error": _text(item.get("error"))}
        for item in value[:MAX_TRIED_LMS]
        if isinstance(item, dict)
    ]


def _named_error(error: str, error_type: str, message: str, data: Any = None) -> DspexError | None:
    """The exception named ``error`` (a ``failed`` event's or an ``execution_failed`` reply's), or None."""
    if error in ("ProgramError", "AllLMsFailed"):
        prefix = f"{error_type}: "
        if error_type and message.startswith(prefix):
            message = message[len(prefix) :]  # the server sent str(ProgramError), which repeats the type
        if error == "AllLMsFailed":
            tried = _tried_untrusted(data.get("tried") if isinstance(data, dict) else None)
            return AllLMsFailed(message, details={"tried": tried})
        return ProgramError(message, error_type=error_type)
    if error in ("WorkerError", "CacheMiss"):
        return WorkerError(message, error_type=error_type)
    if error == "WorkerStartFailed":
        return WorkerStartFailed(message)
    if error in ("WorkerCrashed", "WorkerUnresponsive"):
        return (WorkerUnresponsive if error == "WorkerUnresponsive" else WorkerCrashed)(message, started=True)
    if error == "ProtocolError":
        return ProtocolError(message)
    simple: dict[str, type[DspexError]] = {
        "CallTimeout": CallTimeout,
        "Overloaded": Overloaded,
        "InvalidParams": InvalidParams,
        "LMPolicyRefused": LMPolicyRefused,
        "ProgramNotFound": ProgramNotFound,
        "SessionNotFound": SessionNotFound,
        "UnknownMethod": UnknownMethod,
        "WorkerClosed": WorkerClosed,
    }
    cls = simple.get(error)
    return cls(message) if cls is not None else None


def _kind_error(kind: str, message: str, data: dict[str, Any]) -> DspexError | None:
    """The exception of a stable error kind (``data.kind``), or None for a kind this client does not know."""
    if kind == "overloaded":
        return Overloaded(message)
    if kind == "unavailable":
        return PoolUnavailable(message, reason=_text(data.get("reason")) or message)
    if kind == "unknown_program":
        return ProgramNotFound(message)
    if kind == "session_not_found":
        return SessionNotFound(message)
    if kind == "limit_exceeded":
        limit, maximum = data.get("limit"), data.get("max")
        if isinstance(maximum, bool) or not isinstance(maximum, int | float):
            maximum = 0
        return LimitExceeded(message, limit=_text(limit), max=maximum)
    if kind == "unauthorized":
        return LMPolicyRefused(message)
    if kind == "invalid_params":
        return InvalidParams(message)
    if kind == "method_not_found":
        return UnknownMethod(message)
    return None


def error_from_reply_untrusted(error: dict[str, Any]) -> DspexError:
    """The exception for an error reply (``error`` as checked by :func:`parse_server_message_untrusted`).

    ``parse_error`` and ``invalid_request`` mean the server could not read what this client sent: a
    :class:`RemoteProtocolError` (the two disagree on the protocol); an unknown kind is a
    :class:`~dspex_trio.WorkerError` naming it.
    """
    message = _text(error.get("message"))
    data = error.get("data") or {}
    code = error.get("code")
    named_kind = data.get("kind")
    kind: str = (
        named_kind
        if isinstance(named_kind, str)
        else rpc.KINDS.get(code, "")
        if isinstance(code, int)
        else ""
    )
    if kind == "execution_failed":
        named = _named_error(
            _text(data.get("error")), _text(data.get("type")), _text(data.get("message")) or message, data
        )
        return named if named is not None else WorkerError(message, error_type=_text(data.get("type")))
    if kind in ("parse_error", "invalid_request"):
        return RemoteProtocolError(f"the server could not read a request of this client: {message}")
    found = _kind_error(kind, message, data)
    if found is not None:
        return found
    return WorkerError(message, error_type=kind or f"error {code}")


def error_from_failure_untrusted(data: dict[str, Any]) -> DspexError:
    """The exception for a ``failed`` event's data (``type``, ``error``, ``message``, ``kind``?)."""
    message = _text(data.get("message"))
    named = _named_error(_text(data.get("error")), _text(data.get("type")), message, data)
    if named is not None:
        return named
    kind = data.get("kind")
    found = _kind_error(kind, message, data) if isinstance(kind, str) else None
    if found is not None:
        return found
    return WorkerError(message, error_type=_text(data.get("type")) or _text(data.get("error")))


# -- one execution's events ------------------------------------------------------------------------------------


class ExecutionState(enum.Enum):
    """Where one execution is, as its events tell."""

    SUBMITTED = "submitted"
    """``execution/submit`` was answered; no event yet."""
    RUNNING = "running"
    """``started`` came (always ``seq`` 1)."""
    ENDED = "ended"
    """Its one terminal event came (``completed``, ``failed`` or ``cancelled``)."""


EXECUTION_RULES: Final[dict[tuple[ExecutionState, str], ExecutionState]] = {
    (ExecutionState.SUBMITTED, "started"): ExecutionState.RUNNING,
    (ExecutionState.RUNNING, "chunk"): ExecutionState.RUNNING,
    (ExecutionState.RUNNING, "status"): ExecutionState.RUNNING,
    (ExecutionState.RUNNING, "completed"): ExecutionState.ENDED,
    (ExecutionState.RUNNING, "failed"): ExecutionState.ENDED,
    (ExecutionState.RUNNING, "cancelled"): ExecutionState.ENDED,
}
"""Every allowed (state, event) -> next state of one execution; anything else breaks the protocol."""


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_usage(value: Any) -> bool:
    return value is None or isinstance(value, dict)


_EVENT_FIELDS: Final[dict[str, tuple[tuple[str, Any], ...]]] = {
    "started": (),
    "chunk": (("field", _is_str), ("chunk", _is_str)),
    "status": (("status", _is_str), ("message", _is_str)),
    "completed": (("outputs", _is_object), ("usage", _is_usage)),
    "failed": (("type", _is_str), ("error", _is_str), ("message", _is_str)),
    "cancelled": (("reason", _is_str),),
}
"""The fields each event's ``data`` must have, and their check."""


class ExecutionTrack:
    """The events of one execution, checked: in order (``seq`` 1, 2, 3, ... with no gap), each allowed in
    the execution's state (``EXECUTION_RULES``), each with its fields."""

    __slots__ = ("execution", "seq", "state")

    def __init__(self, execution: str) -> None:
        self.execution = execution
        self.seq = 0
        self.state = ExecutionState.SUBMITTED

    def advance_untrusted(self, seq: Any, event: Any, data: Any) -> bool:
        """Take one event; True if it is the terminal one.

        Raises:
            RemoteProtocolError: out of order, not allowed now, unknown, or with missing or mistyped fields.
        """
        where = f"execution {self.execution[:32]!r}"
        if isinstance(seq, bool) or seq != self.seq + 1:
            raise RemoteProtocolError(
                f"{where}: event seq {str(seq)[:32]} after {self.seq} (a gap or a repeat)"
            )
        if not isinstance(data, dict):
            raise RemoteProtocolError(f"{where}: event data is not an object")
        following = EXECUTION_RULES.get((self.state, event)) if isinstance(event, str) else None
        if following is None:
            raise RemoteProtocolError(
                f"{where}: event {str(event)[:64]!r} is not allowed once it is {self.state.value}"
            )
        for name, check in _EVENT_FIELDS[event]:
            if not check(data.get(name)):
                raise RemoteProtocolError(f"{where}: the {event} event's {name!r} is missing or mistyped")
        self.seq = seq
        self.state = following
        return following is ExecutionState.ENDED


def positive_timeout(timeout: float | None) -> float | None:
    """A call's ``timeout`` checked as the server checks it (finite, > 0), so a bad one fails here."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (timeout > 0 and math.isfinite(timeout))
    ):
        raise InvalidParams(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
    return float(timeout)


# -- health ----------------------------------------------------------------------------------------------------


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RemoteProtocolError(f"health: {what} is not a number")
    return float(value)


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RemoteProtocolError(f"health: {what} is not an integer")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"health: {what} is not a string")
    return value


def _enum(cls: Any, value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise RemoteProtocolError(
            f"health: {what} {str(value)[:32]!r} is not one of {', '.join(cls)}"
        ) from None


def health_snapshot_untrusted(value: Any) -> HealthSnapshot:
    """A :class:`~dspex_trio.HealthSnapshot` from its JSON (``runtime/status``'s ``health``, the
    ``snapshot`` of ``health/subscribe`` and of a ``snapshot`` event).

    Raises:
        RemoteProtocolError: a field missing or of the wrong type.
    """
    if not isinstance(value, dict) or not isinstance(value.get("workers"), list):
        raise RemoteProtocolError("health: the snapshot is not an object with a list of workers")
    workers = []
    for item in value["workers"]:
        if not isinstance(item, dict):
            raise RemoteProtocolError("health: a worker is not an object")
        workers.append(
            WorkerHealth(
                worker_id=_string(item.get("worker_id"), "worker_id"),
                pid=_integer(item.get("pid"), "pid"),
                state=_enum(WorkerState, item.get("state"), "state"),
                in_flight=_integer(item.get("in_flight"), "in_flight"),
                last_heartbeat_age=_number(item.get("last_heartbeat_age"), "last_heartbeat_age"),
                restarts=_integer(item.get("restarts"), "restarts"),
                retiring=bool(item.get("retiring")),
            )
        )
    return HealthSnapshot(
        backend=_string(value.get("backend"), "backend"),
        workers=tuple(workers),
        size=_integer(value.get("size"), "size"),
        restarts=_integer(value.get("restarts"), "restarts"),
        circuit=_enum(CircuitState, value.get("circuit"), "circuit"),
        circuit_reason=_string(value.get("circuit_reason", ""), "circuit_reason"),
        launcher=_string(value.get("launcher", ""), "launcher"),
        seq=_integer(value.get("seq", 0), "seq"),
    )


def apply_health_event(snapshot: HealthSnapshot, kind: str, data: dict[str, Any]) -> HealthSnapshot:
    """The snapshot after one ``health/event`` (``worker_state``: the worker's new state, a new worker
    added, a stopped or failed one removed; ``circuit``: the new circuit state). Events of other kinds,
    and fields that do not parse, leave it as it was: the mirror is a convenience, the events themselves
    reach the subscribers unchanged."""
    try:
        if kind == "worker_state":
            worker_id = _string(data.get("worker_id"), "worker_id")
            state = _enum(WorkerState, data.get("to"), "to")
            pid = _integer(data.get("pid"), "pid")
            if state in (WorkerState.STOPPED, WorkerState.FAILED):
                return attrs.evolve(
                    snapshot, workers=tuple(w for w in snapshot.workers if w.worker_id != worker_id)
                )
            old = next((w for w in snapshot.workers if w.worker_id == worker_id), None)
            if old is None:
                new = WorkerHealth(
                    worker_id=worker_id,
                    pid=pid,
                    state=state,
                    in_flight=0,
                    last_heartbeat_age=0.0,
                    restarts=0,
                    retiring=False,
                )
                return attrs.evolve(snapshot, workers=(*snapshot.workers, new))
            new = attrs.evolve(old, pid=pid, state=state)
            workers = tuple(new if w.worker_id == worker_id else w for w in snapshot.workers)
            return attrs.evolve(snapshot, workers=workers)
        if kind == "circuit":
            circuit = _enum(CircuitState, data.get("to"), "to")
            reason = data.get("reason")
            return attrs.evolve(
                snapshot, circuit=circuit, circuit_reason=reason if isinstance(reason, str) else ""
            )
    except RemoteProtocolError:
        return snapshot
    return snapshot
