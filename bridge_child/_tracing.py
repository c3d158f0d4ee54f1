"""Spans of one traced call inside the worker, recorded as plain data (no OpenTelemetry in the worker).

A ``TracedCall`` carries the caller's W3C ``traceparent``. For it the worker records its own spans
(the call, the DSPy module, each predictor, each LM request: DSPy's callbacks) with that trace id, the
caller's span as the parent of the first, and returns them with the result (``trace_spans``); the host
exports them through its own OpenTelemetry pipeline (``dspex_trio/_tracing.py``). So the workers need
no exporter, no network and no OpenTelemetry import, and an untraced call pays one attribute check.

A span is a dict: ``name``, ``span_id`` and ``parent_id`` (16 hex digits), ``start_ns``, ``end_ns``
(``time.time_ns()``), ``attributes`` (str -> str | int | float | bool), ``error`` (the exception's type
name, or None). At most ``MAX_SPANS`` spans per call (later ones are counted in the first span's
``dspex.spans_dropped``).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

__all__ = ["MAX_SPANS", "SpanRecorder", "parse_traceparent_untrusted"]

MAX_SPANS: Final = 256
"""Spans recorded for one call; more are dropped (and counted)."""
TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse_traceparent_untrusted(value: str) -> tuple[str, str] | None:
    """``(trace id, parent span id)`` of a W3C ``traceparent`` (version 00), or None when it is none."""
    match = TRACEPARENT.fullmatch(value)
    if match is None or match.group(1) == "0" * 32 or match.group(2) == "0" * 16:
        return None
    return match.group(1), match.group(2)


def _new_span_id() -> str:
    return os.urandom(8).hex()


class SpanRecorder:
    """The spans of one call (see the module doc). Thread-safe: DSPy may call back from its threads."""

    def __init__(self, trace_id: str, parent_id: str) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.spans: list[dict[str, Any]] = []
        self.dropped = 0
        self._open: dict[str, dict[str, Any]] = {}
        """DSPy's callback call id -> its span, while open."""
        self._stack = threading.local()
        self._lock = threading.Lock()
        self._root = ""
        """The first span started (the call's own): the parent of spans opened in other threads."""

    def _parent(self) -> str:
        stack = getattr(self._stack, "ids", None)
        if stack:
            return str(stack[-1])
        return self._root or self.parent_id

    def start(self, name: str, attributes: dict[str, Any] | None = None) -> dict[str, Any]:
        span_id = _new_span_id()
        span: dict[str, Any] = {
            "name": name,
            "span_id": span_id,
            "parent_id": self._parent(),
            "start_ns": time.time_ns(),
            "end_ns": None,
            "attributes": dict(attributes or {}),
            "error": None,
        }
        stack = getattr(self._stack, "ids", None)
        if stack is None:
            stack = self._stack.ids = []
        stack.append(span_id)
        if not self._root:
            self._root = span_id
        return span

    def end(self, span: dict[str, Any], error: BaseException | None = None) -> None:
        span["end_ns"] = time.time_ns()
        if error is not None:
            span["error"] = type(error).__name__
        stack = getattr(self._stack, "ids", None)
        if stack and stack[-1] == span["span_id"]:
            stack.pop()
        with self._lock:
            if len(self.spans) < MAX_SPANS:
                self.spans.append(span)
            else:
                self.dropped += 1

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        span = self.start(name, attributes)
        try:
            yield span
        except BaseException as exc:
            self.end(span, exc)
            raise
        self.end(span)

    def finished(self) -> list[dict[str, Any]]:
        """The recorded spans (spans DSPy opened and never closed are ended now, as errors)."""
        for span in list(self._open.values()):
            span["error"] = span["error"] or "Unfinished"
            self.end(span)
        self._open.clear()
        if self.dropped and self.spans:
            self.spans[0]["attributes"]["dspex.spans_dropped"] = self.dropped
        return self.spans

    def dspy_callback(self) -> Any:
        """A DSPy callback (``dspy.context(callbacks=[...])``) that records a span per module call (the
        program and each predictor), per adapter call and per LM request."""
        from dspy.utils.callback import BaseCallback

        recorder = self

        class _Callback(BaseCallback):
            def _open_span(self, call_id: str, name: str, attributes: dict[str, Any]) -> None:
                recorder._open[call_id] = recorder.start(name, attributes)

            def _close_span(self, call_id: str, exception: Exception | None) -> None:
                span = recorder._open.pop(call_id, None)
                if span is not None:
                    recorder.end(span, exception)

            def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
                kind = type(instance).__name__
                self._open_span(call_id, f"dspy.module {kind}", {"dspy.module": kind})

            def on_module_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
                self._close_span(call_id, exception)

            def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
                model = str(getattr(instance, "model", ""))
                self._open_span(call_id, "dspy.lm request", {"gen_ai.request.model": model})

            def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
                self._close_span(call_id, exception)

            def on_tool_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
                name = str(getattr(instance, "name", type(instance).__name__))
                self._open_span(call_id, f"dspy.tool {name}", {"dspy.tool": name})

            def on_tool_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
                self._close_span(call_id, exception)

        return _Callback()
