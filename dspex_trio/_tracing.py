"""OpenTelemetry traces, opt-in: the websocket message, the pool, the worker, and inside the worker.

Off by default, and then free: the call path checks one module attribute (``STATE.tracer is None``) and
imports nothing. On (:func:`enable_tracing`, ``dspex-trio serve --tracing``), one execution gives one
trace:

- ``dspex.websocket <method>`` (server span) for the JSON-RPC request (``_ws_api.py``), each request
  (an execution's lasts until its outcome);
- ``dspex.pool <method>`` for the call or stream through the pool's dispatch (``_dispatch.py``): its
  trace context goes to the worker in the call frame (a ``wire.TracedCall``: its W3C ``traceparent``);
- in the worker (``bridge_child/_tracing.py``): ``dspex.worker execute``, then ``dspy.module <Kind>``
  for the program and each predictor, ``dspy.lm request`` for each LM request, ``dspy.tool <name>``.
  The worker records them as plain data and returns them with the result (or, when the call fails,
  in its error frame's details); they are exported here,
  through the host's pipeline (:func:`ingest_worker_spans`), so workers need no exporter and no network.

Configuration is OpenTelemetry's own: :func:`configure_from_environment` builds an SDK
``TracerProvider`` whose exporters are ``OTEL_TRACES_EXPORTER`` (``otlp``, the default, needs
``opentelemetry-exporter-otlp-proto-http``; ``console``; ``none``), with ``OTEL_EXPORTER_OTLP_*``,
``OTEL_SERVICE_NAME`` (default ``dspex-trio``) and ``OTEL_RESOURCE_ATTRIBUTES`` read by the SDK.
An application passes its own provider to :func:`enable_tracing` (or none: the global one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Final

import attrs

__all__ = [
    "MAX_WORKER_SPANS",
    "STATE",
    "configure_from_environment",
    "current_traceparent",
    "disable_tracing",
    "enable_tracing",
    "end_span",
    "ingest_worker_spans",
    "mark_current_error",
    "mark_error",
    "span",
    "start_span",
    "traceparent_of",
]

MAX_WORKER_SPANS: Final = 256
"""Spans taken from one worker result (the worker records at most as many)."""
MAX_SPAN_NAME_CHARS: Final = 128
MAX_ATTRIBUTES: Final = 32
"""Attributes kept per worker span."""
_HEX16: Final = re.compile(r"[0-9a-f]{16}")


@attrs.define
class _State:
    tracer: Any = None
    """The OpenTelemetry tracer while tracing is on, else None (the only thing the call path reads)."""
    provider: Any = None


STATE: Final = _State()


def enable_tracing(provider: Any = None) -> None:
    """Trace every call from now on, with ``provider`` (an OpenTelemetry ``TracerProvider``; default the
    global one). Worker spans are exported through an SDK provider's span processors."""
    from opentelemetry import trace

    from dspex_trio import __version__

    STATE.provider = provider if provider is not None else trace.get_tracer_provider()
    STATE.tracer = STATE.provider.get_tracer("dspex_trio", __version__)


def disable_tracing() -> None:
    """Stop tracing (spans already started end as usual)."""
    STATE.tracer = None
    STATE.provider = None


def configure_from_environment() -> Any:
    """An SDK ``TracerProvider`` configured the standard OpenTelemetry way (see the module doc), with
    tracing enabled on it. Raises ``RuntimeError`` naming what to install when an exporter is missing."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "dspex-trio")})
    provider = TracerProvider(resource=resource)
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        if name == "console":
            exporter: Any = ConsoleSpanExporter()
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise RuntimeError(
                    "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http: install it, or "
                    "set OTEL_TRACES_EXPORTER=console"
                ) from None
            exporter = OTLPSpanExporter()
        else:
            raise RuntimeError(f"OTEL_TRACES_EXPORTER={name!r}: this runtime knows otlp, console and none")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    enable_tracing(provider)
    return provider


_NO_SPAN: Final = nullcontext(None)
"""What :func:`span` gives while tracing is off: no generator per call on the hot paths."""


def span(
    name: str, attributes: dict[str, Any] | None = None, *, server: bool = False
) -> AbstractContextManager[Any]:
    """A span around the block (current within it), or nothing (``None``) while tracing is off."""
    if STATE.tracer is None:
        return _NO_SPAN
    return _span(name, attributes, server=server)


@contextmanager
def _span(name: str, attributes: dict[str, Any] | None, *, server: bool) -> Iterator[Any]:
    tracer = STATE.tracer
    if tracer is None:  # switched off in between
        yield None
        return
    from opentelemetry.trace import SpanKind

    kind = SpanKind.SERVER if server else SpanKind.INTERNAL
    with tracer.start_as_current_span(name, kind=kind, attributes=attributes) as current:
        yield current


def start_span(name: str, attributes: dict[str, Any] | None = None) -> Any:
    """A span started now as a child of the current one, but not made current: a stream's, which lives
    across its consumer's iterations (end it with :func:`end_span`). None while tracing is off."""
    tracer = STATE.tracer
    if tracer is None:
        return None
    return tracer.start_span(name, attributes=attributes)


def mark_error(current: Any, error: BaseException | str) -> None:
    """Give ``current`` (a span, or None) the error status, described by ``error``'s type name (or
    ``error`` itself): what a failure caught inside the span, and so not raised through it, needs."""
    if current is None:
        return
    from opentelemetry.trace import Status, StatusCode

    described = error if isinstance(error, str) else type(error).__name__
    current.set_status(Status(StatusCode.ERROR, described[:MAX_SPAN_NAME_CHARS]))


def mark_current_error(error: BaseException | str) -> None:
    """:func:`mark_error` on the current span, when tracing is on (a failure caught within its block)."""
    if STATE.tracer is None:
        return
    from opentelemetry import trace

    mark_error(trace.get_current_span(), error)


def end_span(current: Any, error: BaseException | str | None = None) -> None:
    """End a span of :func:`start_span` (None: nothing), with the error status when ``error`` is given."""
    if current is None:
        return
    if error is not None:
        mark_error(current, error)
    current.end()


def traceparent_of(current: Any) -> str:
    """The W3C ``traceparent`` of ``current`` (a span) when it is sampled, else ``""``."""
    if current is None:
        return ""
    context = current.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span when tracing is on and it is sampled, else ``""``."""
    if STATE.tracer is None:
        return ""
    from opentelemetry import trace

    return traceparent_of(trace.get_current_span())


def _attributes_untrusted(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for key, item in list(value.items())[:MAX_ATTRIBUTES]:
        if isinstance(key, str) and isinstance(item, str | int | float | bool):
            out[key[:MAX_SPAN_NAME_CHARS]] = item[:1024] if isinstance(item, str) else item
    return out


def ingest_worker_spans(spans: Any, traceparent: str) -> int:
    """Export the spans a worker returned for the call traced as ``traceparent``: each becomes a finished
    span of that trace in the provider's span processors. Malformed entries are skipped. Returns how
    many were exported."""
    provider = STATE.provider
    processor = getattr(provider, "_active_span_processor", None)  # the SDK's; an API-only one has none
    if processor is None or not isinstance(spans, Sequence) or not traceparent:
        return 0
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

    trace_id = int(traceparent[3:35], 16)
    flags = TraceFlags(int(traceparent[53:55], 16))
    scope = InstrumentationScope("bridge_child")
    exported = 0
    for raw in list(spans)[:MAX_WORKER_SPANS]:
        if not isinstance(raw, dict):
            continue
        span_id, parent_id = raw.get("span_id"), raw.get("parent_id")
        name, start, end = raw.get("name"), raw.get("start_ns"), raw.get("end_ns")
        if not (
            isinstance(span_id, str)
            and _HEX16.fullmatch(span_id)
            and isinstance(parent_id, str)
            and _HEX16.fullmatch(parent_id)
            and isinstance(name, str)
            and isinstance(start, int)
            and isinstance(end, int)
            and end >= start
        ):
            continue
        error = raw.get("error")
        status = Status(StatusCode.ERROR, str(error)[:128]) if error else Status(StatusCode.UNSET)
        processor.on_end(
            ReadableSpan(
                name=name[:MAX_SPAN_NAME_CHARS],
                context=SpanContext(trace_id, int(span_id, 16), is_remote=False, trace_flags=flags),
                parent=SpanContext(trace_id, int(parent_id, 16), is_remote=False, trace_flags=flags),
                resource=getattr(provider, "resource", None),
                attributes=_attributes_untrusted(raw.get("attributes")),
                status=status,
                start_time=start,
                end_time=end,
                instrumentation_scope=scope,
            )
        )
        exported += 1
    return exported
