"""What a websocket client is told of an error: its JSON-RPC error, or the data of a ``failed`` event.

A client is not the operator: our own errors and the program's own failure reach it as they are
(bounded), any other error's text (it may hold a worker's stderr, a traceback, paths) is logged with a
correlation id, and the client gets that id (``internal error (ref r_...)``). Pure mapping, no I/O
beyond the log line; the connection logic (``_ws_api.py``) sends what these build.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Final

from dspex_trio import _jsonrpc as rpc
from dspex_trio._client_lm import LMPolicyRefused
from dspex_trio._errors import (
    AllLMsFailed,
    CallTimeout,
    DspexError,
    InvalidParams,
    JobCancelled,
    JobFailed,
    LimitExceeded,
    Overloaded,
    PoolUnavailable,
    ProgramError,
    ProgramNotFound,
    SessionNotFound,
    UnknownMethod,
    WorkerClosed,
)
from dspex_trio._events import TooManySubscribers

logger = logging.getLogger("dspex_trio.websocket")

MAX_CLIENT_ERROR_CHARS: Final = 2000
"""Longest error message a client gets, in characters (the log has the rest)."""
_CLEAR_ERRORS: Final = (
    InvalidParams,
    ProgramNotFound,
    SessionNotFound,
    LimitExceeded,
    Overloaded,
    CallTimeout,
    UnknownMethod,
    WorkerClosed,
    ProgramError,
    JobFailed,  # its text: the program's own failure, or ours (``dspex_trio._jobs.error_info``)
    JobCancelled,
)
"""Errors whose text a client may read (ours, or the program's own failure); any other error's text may
hold internals (a worker's stderr, a traceback, paths) and is logged, the client gets a reference."""


def new_ref() -> str:
    """A correlation id, given to a client in place of internal error text and logged with it."""
    return f"r_{secrets.token_hex(6)}"


def client_message(exc: BaseException) -> str:
    """An error's text for a client: ours and the program's as they are (bounded), anything else as a
    reference to the log line that holds it."""
    if isinstance(exc, rpc.RpcError):
        return exc.message
    if isinstance(exc, _CLEAR_ERRORS):
        text = str(exc)
    elif isinstance(exc, PoolUnavailable):
        text = f"the server cannot run executions now: {exc.reason.splitlines()[0] if exc.reason else ''}"
    else:
        ref = new_ref()
        logger.error(
            "%s (ref %s): %s", type(exc).__name__, ref, exc, exc_info=not isinstance(exc, DspexError)
        )
        text = f"{_GENERIC.get(type(exc).__name__, 'internal error')} (ref {ref})"
    if len(text) > MAX_CLIENT_ERROR_CHARS:
        text = text[:MAX_CLIENT_ERROR_CHARS] + "... (truncated)"
    return text


_GENERIC: Final = {
    "WorkerCrashed": "the worker running it died",
    "WorkerUnresponsive": "the worker running it stopped answering and was replaced",
    "WorkerStartFailed": "no worker could be started",
    "WorkerError": "the worker failed unexpectedly",
    "ProtocolError": "the worker broke the protocol and was replaced",
}


def rpc_error_from(exc: Exception) -> rpc.RpcError:
    """The JSON-RPC error for an exception of a backend (its message fit for a client)."""
    if isinstance(exc, rpc.RpcError):
        return exc
    if isinstance(exc, Overloaded):
        return rpc.RpcError(rpc.OVERLOADED, client_message(exc))
    if isinstance(exc, PoolUnavailable):
        return rpc.RpcError(rpc.UNAVAILABLE, client_message(exc))
    if isinstance(exc, WorkerClosed):
        return rpc.RpcError(rpc.UNAVAILABLE, client_message(exc))
    if isinstance(exc, ProgramNotFound):
        return rpc.RpcError(rpc.UNKNOWN_PROGRAM, client_message(exc))
    if isinstance(exc, SessionNotFound):
        return rpc.RpcError(rpc.SESSION_NOT_FOUND, client_message(exc))
    if isinstance(exc, LimitExceeded):
        return rpc.RpcError(
            rpc.LIMIT_EXCEEDED, client_message(exc), data={"limit": exc.limit, "max": exc.max}
        )
    if isinstance(exc, LMPolicyRefused):
        return rpc.RpcError(rpc.UNAUTHORIZED, client_message(exc))
    if isinstance(exc, InvalidParams):
        message = client_message(exc)
        return rpc.RpcError(rpc.INVALID_PARAMS, message, data={"errors": [message]})
    if isinstance(exc, TooManySubscribers):
        return rpc.RpcError(rpc.LIMIT_EXCEEDED, str(exc), data={"limit": "subscribers"})
    if isinstance(exc, DspexError):
        data = failure(exc, with_kind=False)  # no stable kind fits (with it, each would ask the other)
        return rpc.RpcError(rpc.EXECUTION_FAILED, data["message"], data=data)
    ref = new_ref()
    logger.error("internal error (ref %s)", ref, exc_info=exc)
    return rpc.RpcError(rpc.INTERNAL_ERROR, f"internal error (ref {ref})")


def failure(exc: Exception, *, with_kind: bool = True) -> dict[str, Any]:
    """The ``data`` of a ``failed`` event: ``type`` (the original error type, e.g. ``LMRateLimitError``),
    ``error`` (the dspex-trio exception), ``message``, and ``kind`` when one of the stable kinds fits."""
    if with_kind and isinstance(exc, DspexError) and not isinstance(exc, ProgramError):
        error = rpc_error_from(exc)
        if error.code == rpc.EXECUTION_FAILED:
            # made below (no kind fits): its message made (and logged) once
            return {k: v for k, v in error.data.items() if k != "kind"}
        return {**failure(exc, with_kind=False), "kind": error.data["kind"]}
    error_type = type(exc).__name__
    if isinstance(exc, ProgramError) and exc.error_type:
        error_type = exc.error_type
    data: dict[str, Any] = {"type": error_type, "error": type(exc).__name__, "message": client_message(exc)}
    if isinstance(exc, AllLMsFailed):  # every LM of the fallback chain, in order, and its error type
        data["tried"] = exc.tried
    return data
