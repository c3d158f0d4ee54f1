"""The typed errors of the public contract. Plain cancellation stays ``trio.Cancelled``."""

from __future__ import annotations

import signal
from typing import Any

import attrs

from bridge_child import wire


class DspexError(Exception):
    """Base of every error dspex-trio raises."""

    attempts: int = 1
    """How many times the call that ended in this error was sent to a worker (re-dispatches and the
    idempotent retry included)."""


class WorkerCrashed(DspexError):
    """The worker died (or was killed) with the call pending.

    ``started`` is False when the call was never acked: it never ran, and the pool re-dispatches it.
    ``exit_status`` names the exit code or signal when known.
    """

    def __init__(self, message: str, *, started: bool = True, exit_status: ExitStatus | None = None) -> None:
        super().__init__(message)
        self.started = started
        self.exit_status = exit_status


class WorkerUnresponsive(WorkerCrashed):
    """The worker stopped answering (missed heartbeats or no ack in time); it was killed."""


class WorkerStartFailed(WorkerCrashed):
    """The worker did not complete its handshake: it crashed at start, or was too slow."""

    def __init__(self, message: str, *, exit_status: ExitStatus | None = None) -> None:
        super().__init__(message, started=False, exit_status=exit_status)


class WorkerClosed(DspexError):
    """The worker (or pool) is closed or closing and takes no new calls."""


class CallTimeout(DspexError, TimeoutError):
    """The call's deadline passed; the call was cancelled in the worker."""


class Overloaded(DspexError):
    """Admission is full: the call was refused at once (nothing was sent)."""


class PoolUnavailable(DspexError):
    """The pool cannot serve calls now (its circuit is open); ``reason`` says why."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class UnknownMethod(DspexError):
    """The worker has no such method (diagnostic methods exist only with ``diagnostics=True``)."""


class InvalidParams(DspexError, ValueError):
    """The method refused its params, or they cannot be encoded."""


class ProgramNotFound(DspexError, KeyError):
    """No such program in the session."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SessionNotFound(DspexError, KeyError):
    """No such session (over the websocket: no session with that server-minted id, or it expired)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class LimitExceeded(DspexError, ValueError):
    """A bound set by the operator was reached (sessions, programs, bytes). ``limit`` names it and
    ``max`` is its value; nothing was changed."""

    def __init__(self, message: str, *, limit: str, max: int | float) -> None:
        super().__init__(message)
        self.limit = limit
        self.max = max


class ProgramError(DspexError):
    """The program itself failed (LM errors included). ``error_type`` names the original exception type."""

    def __init__(self, message: str, *, error_type: str = "", details: Any = None) -> None:
        super().__init__(f"{error_type}: {message}" if error_type else message)
        self.error_type = error_type
        self.details = details


class AllLMsFailed(ProgramError):
    """Every LM of the execution's fallback chain failed with a provider failure (``5xx``, ``429``,
    timeout, connect error): ``tried`` lists each, in order, as ``{"lm": "model @ base", "error":
    "LMServerError"}`` (also ``details["tried"]``); the message says why each failed."""

    def __init__(self, message: str, *, error_type: str = "AllLMsFailed", details: Any = None) -> None:
        super().__init__(message, error_type=error_type, details=details)
        tried = details.get("tried") if isinstance(details, dict) else None
        self.tried: list[dict[str, Any]] = list(tried) if isinstance(tried, list) else []


class JobFailed(DspexError):
    """A job (evaluate, compile) stopped: as many examples failed as its ``max_errors`` allows, or its
    optimizer failed. ``results`` holds the examples finished before it stopped (``ExampleResult``)."""

    def __init__(self, message: str, *, results: Any = None) -> None:
        super().__init__(message)
        self.results = results if results is not None else []


class JobCancelled(DspexError):
    """A job was cancelled before it ended (its block was left, or ``job/cancel`` was sent)."""


class ProgramModuleError(DspexError, ValueError):
    """An operator's program module cannot be used (it does not import, or registers something invalid):
    the pool, bridge or mock does not start. The message names the module and what is wrong."""


class WorkerError(DspexError):
    """The worker raised an unexpected exception running the call; ``error_type`` names it."""

    def __init__(self, message: str, *, error_type: str = "", details: Any = None) -> None:
        super().__init__(f"{error_type}: {message}" if error_type else message)
        self.error_type = error_type
        self.details = details


class ProtocolError(DspexError, wire.ProtocolError):
    """The worker broke the wire protocol (corrupt or unexpected frame); it was killed.

    ``started`` is False when the call was never acked (the pool then re-dispatches it).
    """

    def __init__(self, message: str, *, started: bool = True) -> None:
        super().__init__(message)
        self.started = started


class CacheMiss(WorkerError):
    """The worker does not hold the program version the call named (the pool resends it with the spec)."""


@attrs.frozen
class ExitStatus:
    """How a worker process ended."""

    code: int | None
    """Exit code, when it exited."""
    signal: int | None
    """Signal number, when a signal killed it. Both None: it is gone but its status is unknown (a
    zygote-forked worker whose template died before reporting it)."""

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        if returncode < 0:
            return cls(code=None, signal=-returncode)
        return cls(code=returncode, signal=None)

    def describe(self) -> str:
        if self.signal is not None:
            try:
                return f"killed by {signal.Signals(self.signal).name}"
            except ValueError:
                return f"killed by signal {self.signal}"
        if self.code is None:
            return "exit status unknown"
        return f"exit code {self.code}"


def error_from_frame(frame: wire.Error, *, acked: bool, worker: str) -> DspexError:
    """Map a worker's ``Error`` frame to the contract's exception."""
    code = frame.code
    message = frame.message or code
    if code == wire.ErrorCode.UNKNOWN_METHOD:
        return UnknownMethod(message)
    if code in (wire.ErrorCode.INVALID_PARAMS, wire.ErrorCode.UNENCODABLE):
        return InvalidParams(message)
    if code == wire.ErrorCode.CACHE_MISS:
        return CacheMiss(message, error_type=frame.type, details=frame.details)
    if code == wire.ErrorCode.PROGRAM_NOT_FOUND:
        return ProgramNotFound(message)
    if code == wire.ErrorCode.PROGRAM_ERROR and frame.type == "AllLMsFailed":
        return AllLMsFailed(message, details=frame.details)
    if code == wire.ErrorCode.PROGRAM_ERROR:
        return ProgramError(message, error_type=frame.type, details=frame.details)
    if code == wire.ErrorCode.TIMEOUT:
        return CallTimeout(message)
    if code == wire.ErrorCode.SHUTTING_DOWN:
        return WorkerClosed(f"{worker} is shutting down")
    if code == wire.ErrorCode.CANCELLED:
        return WorkerClosed(f"{worker} cancelled the call ({message})")
    return WorkerError(message, error_type=frame.type, details=frame.details)
