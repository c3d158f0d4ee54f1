"""What a log line is about: the worker, the execution, the session and the trace, as fields.

A context variable holds the fields of the task that logs (Trio tasks inherit it from the task that
started them): :func:`bind` sets them for a block (``worker_id`` for a worker's own tasks,
``execution`` and ``session`` for an execution's), and :func:`fields` reads them, with the current
``trace_id`` while tracing is on. ``dspex-trio --log-format json`` writes them into every line
(``_cli.py``); library code configures no logging.

Session ids are written as :func:`~dspex_trio._sessions.public_session_id` gives them: a minted id is a
capability, so only its prefix.
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Final

from dspex_trio import _tracing

__all__ = ["CONTEXT", "bind", "bound", "fields"]

CONTEXT: Final[contextvars.ContextVar[Mapping[str, str]]] = contextvars.ContextVar(
    "dspex_log_context", default=types.MappingProxyType({})
)


def bind(**values: str) -> contextvars.Token[Mapping[str, str]]:
    """Add ``values`` to the current task's fields (undo with ``CONTEXT.reset(token)``)."""
    return CONTEXT.set({**CONTEXT.get(), **values})


class _Bound:
    """The block of :func:`bound` (a class: no generator per block on the websocket's execution path)."""

    __slots__ = ("_token", "_values")

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values

    def __enter__(self) -> None:
        self._token = bind(**self._values)

    def __exit__(self, *exc_info: object) -> None:
        CONTEXT.reset(self._token)


def bound(**values: str) -> AbstractContextManager[None]:
    """``values`` added to the fields within the block."""
    return _Bound(values)


def fields() -> dict[str, Any]:
    """The current task's fields, and ``trace_id`` (32 hex digits) when a traced span is current."""
    out: dict[str, Any] = dict(CONTEXT.get())
    traceparent = _tracing.current_traceparent()
    if traceparent:
        out["trace_id"] = traceparent[3:35]
    return out
