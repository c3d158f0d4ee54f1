"""A worker method and what it sees of its call: params, cancellation, deadline, a way to stream events.

A method is ``func(worker, ctx) -> value`` (plain data), described by a :class:`Method` (how the worker
runs it); it fails its call by raising :class:`MethodError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from bridge_child import wire

if TYPE_CHECKING:
    from bridge_child._server import Worker


class MethodError(Exception):
    """Raised by a method to fail its call with a specific ``wire.ErrorCode``."""

    def __init__(self, code: wire.ErrorCode, message: str, *, type: str = "", details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.type = type
        self.details = details


def invalid_params(message: str) -> MethodError:
    return MethodError(wire.ErrorCode.INVALID_PARAMS, message, type="InvalidParams")


_EVENT_LOCK = threading.Lock()
"""Makes each call's ``cancelled`` event exactly once, whichever threads ask for it first."""


class CallContext:
    """One call inside the worker. Created by the reader when it acks the call.

    ``cancelled`` is set when a ``Cancel`` frame arrives (or the worker shuts down); a method that
    waits or loops checks it and returns early. Whatever a cancelled method returns is discarded: the
    terminal ``cancelled`` error was already sent. The event is made on first use (``cancelled``):
    most calls (a no-op, an inline method) finish without anyone waiting on or setting it, and making
    a ``threading.Event`` (a ``Condition`` and its lock) was a tenth of the worker's work per no-op call.
    """

    __slots__ = (
        "_cancelled",
        "_emit",
        "captured",
        "deadline",
        "finished",
        "id",
        "method",
        "params",
        "seq",
        "stream",
        "trace",
    )

    def __init__(
        self,
        call: wire.Call,
        emit: Callable[[CallContext, Any], None],
    ) -> None:
        self.id = call.id
        self.method = call.method
        self.params = call.params
        self.stream = bool(call.flags & wire.FLAG_STREAM)
        self.trace = call.trace if type(call) is wire.TracedCall else ""
        """The caller's W3C ``traceparent`` (a ``TracedCall``), else empty (``_tracing.py``)."""
        self.deadline = None if call.timeout is None else time.monotonic() + call.timeout
        self._cancelled: threading.Event | None = None
        self.finished = False
        """True once the terminal frame was sent (guarded by the worker's send lock)."""
        self.seq = 0
        self.captured: dict[str, Any] | None = None
        """What the method's lane check captured when the call was read (``execute``: the worker's LM
        configuration then, so a ``configure_lm`` read after the call does not change it)."""
        self._emit = emit

    @property
    def cancelled(self) -> threading.Event:
        """Set when the call is cancelled (a ``Cancel`` frame, or the worker's shutdown); made on first
        use by any thread (once: two threads asking at once get the same event)."""
        event = self._cancelled
        if event is None:
            with _EVENT_LOCK:
                event = self._cancelled
                if event is None:
                    event = self._cancelled = threading.Event()
        return event

    def is_cancelled(self) -> bool:
        """``cancelled.is_set()``, without making the event when nobody made it yet (then: False)."""
        event = self._cancelled
        return event is not None and event.is_set()

    def emit(self, data: Any) -> None:
        """Send one ``Event`` frame for this call (a stream chunk or progress); dropped once finished."""
        self._emit(self, data)

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def param(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """``params[name]`` checked against ``kind``; ``MethodError(INVALID_PARAMS)`` otherwise."""
        params = self.params if self.params is not None else {}
        if not isinstance(params, dict):
            raise invalid_params(f"{self.method}: params must be an object, not {type(params).__name__}")
        if name not in params:
            if default is ...:
                raise invalid_params(f"{self.method}: missing param {name!r}")
            return default
        value = params[name]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise invalid_params(f"{self.method}: param {name!r} must be a number, not a boolean")
        if not isinstance(value, kind):
            raise invalid_params(f"{self.method}: param {name!r} has the wrong type ({type(value).__name__})")
        return value


@attrs.frozen
class Method:
    """One method of the worker's registry and how the worker runs it."""

    func: Callable[[Worker, CallContext], Any]
    inline: bool = False
    """Run by the reader thread itself (cheap, non-blocking)."""
    flush_first: bool = False
    """Inline only: write the ack before running (for methods that never return)."""
    diagnostic: bool = False
    lane: Callable[[Worker, CallContext], bool] | None = None
    """Says whether a call is CPU-bound: such calls run one at a time on the worker's CPU lane (the
    reader thread, relieved when a call runs long), not in the thread pool. See ``_lane``."""
    aio: Callable[[Worker, CallContext], Awaitable[Any]] | None = None
    """The method as a coroutine, for the worker's asynchronous lane (``_aio``), if it has one."""
    on_aio: Callable[[Worker, CallContext], bool] | None = None
    """Says whether a call runs on the asynchronous lane (when the worker has one): I/O-bound calls
    that need no thread of their own."""
