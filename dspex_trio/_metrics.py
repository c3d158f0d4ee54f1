"""Prometheus metrics: a custom collector that reads the runtime at scrape time.

:class:`RuntimeCollector` builds every family from ``backend.statistics()`` (and the websocket server's
``statistics()`` when given one) each time it is collected, so the call path pays nothing beyond the
integer increments of ``_call_metrics.py`` (calls by method and outcome, duration histograms) and of the
collector's own transition hook (worker starts and exits by cause, counted as they happen). Worker RSS
and age are read from ``/proc`` at scrape time.

prometheus-client is imported only when a collector is built or a scrape is rendered: the worker
processes and an application that never scrapes do not import it.

Embedding applications register the collector in their own registry::

    from prometheus_client import REGISTRY
    REGISTRY.register(dspex_trio.RuntimeCollector(pool))

or serve ``/metrics`` (with ``/healthz``, ``/readyz`` and the dashboard) on a port of their own with
:func:`dspex_trio.serve_http`.

Extension point: ``collector.add_source(source)`` adds a callable that yields more metric families at
each scrape (the LM layer's requests, tokens, errors, throttling and cache hits by model, when it has
them: ``pool.statistics()`` carries none of those today).

Every family and its labels is listed in ``docs/monitoring.md``.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from dspex_trio._breaker import CircuitState
from dspex_trio._call_metrics import CallMetrics
from dspex_trio._states import WorkerState
from dspex_trio._statistics import PoolStatistics

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from dspex_trio._backend import Backend
    from dspex_trio._websocket import WebsocketServer
    from dspex_trio._worker import Worker

__all__ = [
    "EXIT_CAUSES",
    "PREFIX",
    "RuntimeCollector",
    "exit_cause",
    "process_rss_bytes",
    "process_start_seconds",
    "render_metrics",
]

PREFIX: Final = "dspex"
"""The namespace of every family."""
EXIT_CAUSES: Final = ("stopped", "killed", "exited", "unresponsive", "protocol", "start_timeout")
"""The ``cause`` label of ``dspex_worker_exits_total``: a closed set (see :func:`exit_cause`)."""
MAX_NODE_LABEL_CHARS: Final = 64
"""The ``node`` label of per-worker series is cut to this many characters (a Ray node id is 56)."""
REMOTE_LAUNCHERS: Final = frozenset({"ray"})
"""Launchers whose workers may run on another machine: no /proc series for them."""
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
"""Bytes per page, for ``/proc/<pid>/statm``."""
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
"""Clock ticks per second, for ``/proc/<pid>/stat``'s start time."""
PROC_READ_BYTES: Final = 4096
"""Bytes read of a /proc file (``statm``, ``stat``, ``uptime`` are far shorter)."""

Source = Callable[[], Iterable["Metric"]]
"""An extra source of metric families, called at each scrape (``RuntimeCollector.add_source``)."""


def node_label(node: str) -> str:
    """The ``node`` label of a worker's series: where it runs ("" on this machine), bounded in length.
    Its values are as many as the pool's nodes, which the pool's size bounds."""
    return str(node)[:MAX_NODE_LABEL_CHARS]


def exit_cause(new: WorkerState, reason: str) -> str:
    """The cause of a worker's exit (its transition into a terminal state, with the transition's
    reason), one of ``EXIT_CAUSES``."""
    if new is WorkerState.STOPPED:
        return "stopped"
    if "heartbeat" in reason or "not acked" in reason:
        return "unresponsive"
    if reason.startswith("protocol error") or "frame stream" in reason:
        return "protocol"
    if "no hello" in reason:
        return "start_timeout"
    if "killed by" in reason:
        return "killed"
    return "exited"


def _read_proc(path: str) -> bytes | None:
    """A small /proc file's bytes (one unbuffered read: a scrape reads one per worker), or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, PROC_READ_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)


def uptime_seconds() -> float | None:
    text = _read_proc("/proc/uptime")
    try:
        return float(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None


def process_start_seconds(pid: int) -> float | None:
    """When process ``pid`` started, in seconds after boot (``/proc/<pid>/stat``), or None."""
    stat = _read_proc(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:  # the command name (field 2) may hold spaces: count fields after its closing parenthesis
        return int(stat[stat.rindex(b")") + 2 :].split()[19]) / CLOCK_TICKS
    except (ValueError, IndexError):
        return None


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of process ``pid`` (``/proc/<pid>/statm``), or None."""
    statm = _read_proc(f"/proc/{pid}/statm")
    try:
        return int(statm.split()[1]) * PAGE_SIZE if statm else None
    except (ValueError, IndexError):
        return None


def _remote_usage(worker: Any) -> Any:
    """The ``ProcessUsage`` of a worker running elsewhere, if its process handle reports one
    (``TcpWorker.usage``: a Ray worker's agent reads its node's ``/proc``), else None."""
    usage = getattr(getattr(worker, "process", None), "usage", None)
    return usage() if callable(usage) else None


class RuntimeCollector:
    """A prometheus-client collector of a backend (a pool, best) and optionally its websocket server.

    Register it in a ``CollectorRegistry`` (``registry.register(collector)``); each scrape calls
    :meth:`collect`. Worker exits are counted from the moment it is built, and starts from the workers
    live then (a pool's transition hook); every other counter is the runtime's own, since the pool
    opened.
    """

    def __init__(self, backend: Backend, *, server: WebsocketServer | None = None) -> None:
        import prometheus_client.metrics_core  # noqa: F401  (lazily: fail here, not at the first scrape)

        self.backend = backend
        self.server = server
        self._sources: list[Source] = []
        self._started: dict[int, float | None] = {}
        """pid -> start time after boot (read once per worker: it never changes)."""
        live = getattr(backend, "workers", None)
        self.worker_starts = len(live()) if callable(live) else 0
        """Workers that became ready: those live when the collector was built, and each start since."""
        self.worker_exits: collections.Counter[str] = collections.Counter({cause: 0 for cause in EXIT_CAUSES})
        hooks = getattr(backend, "_transition_hooks", None)
        if isinstance(hooks, list):
            hooks.append(self._on_transition)

    def add_source(self, source: Source) -> None:
        """Yield the families of ``source()`` too at every scrape (an extension point: the LM layer's
        figures by model)."""
        self._sources.append(source)

    def _on_transition(self, worker: Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
        if old is WorkerState.STARTING and new is WorkerState.READY:
            self.worker_starts += 1
        elif new in (WorkerState.STOPPED, WorkerState.FAILED):
            self.worker_exits[exit_cause(new, reason)] += 1

    def describe(self) -> list[Metric]:
        """Nothing: the registry then does not collect at registration (the families vary with the
        backend)."""
        return []

    @staticmethod
    def _lm_families(lms: Any, gauge: Callable[..., Any], counter: Callable[..., Any]) -> Iterator[Metric]:
        """The LM families: every one always present (empty without budgets), so a dashboard's query
        finds them; errors by status class (``429``, ``5xx``)."""
        for kind, name, doc, read in _LM_FAMILIES:
            family = (counter if kind == "counter" else gauge)(name, doc, labels=("lm",))
            for lm in lms:
                family.add_metric([lm.lm], read(lm))
            yield family
        errors = counter(
            "lm_errors", "LM answers that failed, by LM and status (429, 5xx).", labels=("lm", "status")
        )
        for lm in lms:
            errors.add_metric([lm.lm, "429"], lm.rate_limited)
            errors.add_metric([lm.lm, "5xx"], lm.server_errors)
        yield errors

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def gauge(name: str, doc: str, value: float | None = None, labels: tuple[str, ...] = ()) -> Any:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value, labels=labels or None)

        def counter(name: str, doc: str, value: float | None = None, labels: tuple[str, ...] = ()) -> Any:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value, labels=labels or None)

        stats = self.backend.statistics()
        if isinstance(stats, PoolStatistics):  # it holds everything health() would give: spare the call
            states = [w.state for w in stats.workers]
            size, restarts, circuit_now = stats.size, stats.restarts, stats.circuit
        else:
            health = self.backend.health()
            states = [w.state for w in health.workers]
            size, restarts, circuit_now = health.size, health.restarts, health.circuit
        info = gauge(
            "info",
            "The runtime: version, backend, launcher (value 1).",
            labels=("version", "backend", "launcher"),
        )
        from dspex_trio import __version__

        info.add_metric([__version__, self.backend.name, str(getattr(stats, "launcher", ""))], 1)
        yield info

        # -- workers -------------------------------------------------------------------------------
        by_state = collections.Counter(str(state) for state in states)
        workers = gauge("workers", "Live workers by state.", labels=("state",))
        for state in WorkerState:
            workers.add_metric([str(state)], by_state[str(state)])
        yield workers
        yield gauge("pool_size", "Configured worker slots.", size)
        yield counter(
            "worker_starts",
            "Workers that became ready (those live when the collector was built, and each since).",
            self.worker_starts,
        )
        exits = counter(
            "worker_exits", "Workers that ended, by cause (since the collector was built).", labels=("cause",)
        )
        for cause, count in sorted(self.worker_exits.items()):
            exits.add_metric([cause], count)
        yield exits
        yield counter("worker_restarts", "Workers replaced after failing.", restarts)
        yield counter(
            "workers_recycled",
            "Workers replaced by recycling (call count or memory).",
            getattr(stats, "recycled", 0),
        )

        per_worker = ("worker_id", "node")
        in_flight = gauge("worker_in_flight", "Calls in flight per worker.", labels=per_worker)
        rss = gauge(
            "worker_resident_memory_bytes",
            "Resident memory of each worker process (/proc of its machine; a Ray worker's as its agent "
            "last read it).",
            labels=per_worker,
        )
        age = gauge(
            "worker_age_seconds",
            "Seconds since each worker process started (/proc of its machine; a Ray worker's as its agent "
            "last read it).",
            labels=per_worker,
        )
        uptime = uptime_seconds()
        started = {}
        live = getattr(self.backend, "workers", None)
        handles = {w.worker_id: w for w in live()} if callable(live) else {}
        for worker in getattr(stats, "workers", ()):
            wid = worker.worker_id
            node = node_label(getattr(worker, "node", ""))
            in_flight.add_metric([wid, node], worker.in_flight)
            if getattr(worker, "launcher", "") in REMOTE_LAUNCHERS:
                # its pid is another machine's: this /proc knows nothing of it; its agent may
                remote = _remote_usage(handles.get(wid))
                if remote is not None and remote.rss_bytes is not None:
                    rss.add_metric([wid, node], remote.rss_bytes)
                if remote is not None and remote.age_s is not None:
                    age.add_metric([wid, node], remote.age_s)
                continue
            resident = process_rss_bytes(worker.pid)
            if resident is None:
                continue  # gone (or no /proc)
            rss.add_metric([wid, node], resident)
            start = started[worker.pid] = (
                self._started[worker.pid]
                if worker.pid in self._started
                else process_start_seconds(worker.pid)
            )
            if start is not None and uptime is not None:
                age.add_metric([wid, node], max(0.0, uptime - start))
        self._started = started  # forget the workers that are gone (a pid may be reused)
        yield from (in_flight, rss, age)
        workers_now = getattr(stats, "workers", ())
        if workers_now:  # the same for every worker of a pool: one sample, not one per worker
            yield gauge("worker_capacity", "Calls each worker runs at once.", workers_now[0].capacity)

        # -- the circuit -------------------------------------------------------------------------------
        circuit = gauge(
            "circuit_state", "The pool's circuit breaker: 1 for its current state.", labels=("state",)
        )
        for circuit_state in CircuitState:
            circuit.add_metric([str(circuit_state)], 1 if circuit_now is circuit_state else 0)
        yield circuit
        yield counter(
            "circuit_opened",
            "Times the circuit opened (trips and failed probes).",
            getattr(stats, "circuit_opened", 0),
        )

        # -- calls -------------------------------------------------------------------------------------
        yield gauge("in_flight", "Calls running on workers.", getattr(stats, "in_flight", 0))
        yield gauge("queue_depth", "Calls waiting for a worker.", getattr(stats, "queued", 0))
        yield gauge("sessions", "Sessions held by the host.", getattr(stats, "sessions", 0))
        refusals = counter("refusals", "Calls refused at admission, by reason.", labels=("reason",))
        refusals.add_metric(["overloaded"], getattr(stats, "overloaded", 0))
        refusals.add_metric(["unavailable"], getattr(stats, "unavailable", 0))
        yield refusals
        yield counter(
            "calls_redispatched",
            "Calls re-sent after their worker died before acking them.",
            getattr(stats, "redispatched", 0),
        )
        yield counter(
            "calls_retried", "Idempotent calls retried on another worker.", getattr(stats, "retried", 0)
        )
        calls = counter("calls", "Calls that ended, by method and outcome.", labels=("method", "outcome"))
        durations = HistogramMetricFamily(
            f"{PREFIX}_call_duration_seconds",
            "Call durations (admission to outcome), by method.",
            labels=["method"],
        )
        metrics = getattr(self.backend, "call_metrics", None)
        if isinstance(metrics, CallMetrics):
            for (method, outcome), count in sorted(metrics.outcomes.items()):
                calls.add_metric([method, outcome], count)
            for method, histogram in sorted(metrics.histograms.items()):
                durations.add_metric([method], histogram.cumulative(), histogram.total_seconds)
        yield calls
        yield durations

        # -- LMs: the pool-wide budgets' book (a pool with ``lm_budgets``; docs/lm.md) ------------------
        yield from self._lm_families(getattr(stats, "lm", ()), gauge, counter)
        usage = getattr(self.backend, "lm_usage", None)
        yield counter(
            "lm_cache_hits",
            "LM answers executions read from the LM cache (their usage's cache_hits; docs/lm.md).",
            getattr(usage, "cache_hits", 0),
        )
        fell_back = counter(
            "lm_fallbacks",
            "LM failures a fallback chain moved past, by the LM that failed.",
            labels=("lm",),
        )
        answered = counter(
            "lm_answered",
            "Executions of an LM with fallbacks, by the LM that answered.",
            labels=("lm",),
        )
        if usage is not None:
            for lm, count in sorted(usage.fallbacks.items()):
                fell_back.add_metric([lm], count)
            for lm, count in sorted(usage.answered_by.items()):
                answered.add_metric([lm], count)
        yield fell_back
        yield answered

        # -- the websocket server ----------------------------------------------------------------------
        if self.server is not None:
            ws = self.server.statistics()
            yield gauge("websocket_connections", "Websocket connections open now.", ws.connections)
            yield counter(
                "websocket_connections_accepted", "Websocket connections accepted.", ws.connections_total
            )
            yield gauge("websocket_executions", "Executions in flight over the websocket.", ws.executions)
            ended = counter(
                "websocket_executions_ended",
                "Executions over the websocket that ended, by outcome.",
                labels=("outcome",),
            )
            for outcome in ("completed", "failed", "cancelled"):
                ended.add_metric([outcome], ws.execution_outcomes.get(outcome, 0))
            yield ended
            refused = counter(
                "websocket_refusals",
                "Handshakes and plain HTTP requests refused, by reason.",
                labels=("reason",),
            )
            for reason, count in sorted(ws.refusals.items()):
                refused.add_metric([reason], count)
            yield refused

        for source in self._sources:
            yield from source()


_LM_FAMILIES: Final[tuple[tuple[str, str, str, Callable[[Any], float]], ...]] = (
    ("counter", "lm_requests", "LM requests granted, by LM (model @ base).", lambda s: s.granted),
    ("gauge", "lm_requests_in_flight", "LM requests in flight now, by LM.", lambda s: s.in_flight),
    ("counter", "lm_tokens", "Tokens the LM's answers reported, by LM.", lambda s: s.tokens),
    (
        "counter",
        "lm_throttled",
        "LM requests that waited for a budget or a pause, by LM.",
        lambda s: s.throttled,
    ),
    (
        "counter",
        "lm_throttled_seconds",
        "Seconds LM requests waited for a budget or a pause, by LM.",
        lambda s: s.throttled_seconds,
    ),
    ("counter", "lm_pauses", "Times a 429 or 5xx paused the LM for every worker, by LM.", lambda s: s.pauses),
    (
        "gauge",
        "lm_paused_seconds",
        "Seconds the LM stays paused from now (0: not paused), by LM.",
        lambda s: s.paused_for,
    ),
    (
        "counter",
        "lm_leases_refused",
        "Leases refused (the pool was closing) or given up before the answer, by LM.",
        lambda s: s.refused,
    ),
)
"""The LM families read from ``PoolStatistics.lm``: (type, name, help, value of one ``LMStatistics``)."""


def render_metrics(collector: RuntimeCollector) -> tuple[bytes, str]:
    """One scrape of ``collector`` in the Prometheus text format: ``(body, content type)``."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]  # typed for its own Collector base
    return generate_latest(registry), CONTENT_TYPE_LATEST
