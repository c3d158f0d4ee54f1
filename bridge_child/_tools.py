"""Registered tools as a program in the worker calls them: bounded by the execution's deadline, stopped
with it.

A program runs in one of the worker's threads (the CPU lane or the pool), and Python cannot stop a
thread. So each call of a registered tool runs in a thread of its own (:func:`guarded`) while the
program's thread waits for it and watches the execution: when the execution is cancelled or its
deadline passes, the program's thread stops waiting and raises :class:`ExecutionStopped` (a
``BaseException``: DSPy's ReAct records a tool's ordinary exceptions in the trajectory and goes on, this
one unwinds the whole program). The tool's own thread is abandoned: it ends when the tool returns, and
what it returns is dropped. At most ``MAX_TOOL_THREADS`` tool calls run (or hang) in a worker at once;
past that a tool call fails at once (recorded in the trajectory like any tool error).

A tool's ordinary exception is the program's business: ReAct writes it into the trajectory, as DSPy
does. A tool that prints writes to the worker's stderr (fd 1 points there): the frame stream is a
private descriptor (see ``bridge_child.__main__``).
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from bridge_child._context import CallContext

MAX_TOOL_THREADS: Final = 256
"""Tool calls running at once in one worker, abandoned ones (still hanging after their execution
ended) included."""
TOOL_POLL_S: Final = 0.02
"""How often a program waiting for a tool looks at its execution's cancel and deadline, in seconds."""

_current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("dspex_call", default=None)
_running = 0
_running_lock = threading.Lock()


class ExecutionStopped(BaseException):
    """The execution was cancelled, or its deadline passed, while a tool ran (``reason``: ``"cancelled"``
    or ``"deadline"``). Not an ``Exception``, so no DSPy module records it and goes on."""

    def __init__(self, reason: str, tool: str) -> None:
        what = "cancelled" if reason == "cancelled" else "past its deadline"
        super().__init__(f"the execution was {what}" + (f" while tool {tool!r} ran" if tool else ""))
        self.reason = reason
        self.tool = tool


@contextmanager
def running(ctx: CallContext) -> Iterator[None]:
    """While the block runs, tools called from this context belong to ``ctx`` (and stop with it)."""
    token = _current_call.set(ctx)
    try:
        yield
    finally:
        _current_call.reset(token)


def running_tools() -> int:
    """Tool calls running now (abandoned ones included)."""
    return _running


def guarded(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` as a tool of an execution: run in its own thread, stopped waiting for when the execution
    is cancelled or times out. Keeps ``func``'s name, docstring and signature (DSPy reads its schema
    from them). Called outside an execution, it simply calls ``func``."""

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        ctx = _current_call.get()
        if ctx is None:
            return func(*args, **kwargs)
        return _call_watched(ctx, name, func, args, kwargs)

    return call


def _call_watched(ctx: CallContext, name: str, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    global _running
    with _running_lock:
        if _running >= MAX_TOOL_THREADS:
            raise RuntimeError(
                f"{MAX_TOOL_THREADS} tool calls are still running in this worker; try again later"
            )
        _running += 1
    done = threading.Event()
    outcome: list[Any] = []
    context = contextvars.copy_context()

    def run() -> None:
        global _running
        try:
            outcome.append((True, context.run(func, *args, **kwargs)))
        except BaseException as exc:  # the tool's failure is the program's to see (SystemExit included)
            outcome.append((False, exc))
        finally:
            with _running_lock:
                _running -= 1
            done.set()

    threading.Thread(target=run, name=f"bridge-tool-{name}", daemon=True).start()
    while not done.wait(TOOL_POLL_S):
        if ctx.cancelled.is_set():
            raise ExecutionStopped("cancelled", name)
        if ctx.remaining() == 0.0:
            raise ExecutionStopped("deadline", name)
    ok, value = outcome[0]
    if ok:
        return value
    if isinstance(value, Exception):
        raise value
    raise RuntimeError(f"tool {name!r} raised {type(value).__name__}: {value}")  # never a BaseException
