"""Statistics records: what ``statistics()`` returns, frozen snapshots (as ``_health.py`` holds what
``health()`` returns).

One home for the worker handle's, the pool's, the ``mock`` and ``bridge`` backends' and the fallback
chain's records, so that none of those modules imports another for a record. (The websocket server's
own, ``WebsocketStatistics``, is the transport's and lives with it in ``_websocket.py``.)
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import attrs

from dspex_trio._breaker import CircuitState
from dspex_trio._states import WorkerState

if TYPE_CHECKING:
    from dspex_trio._lm_budgets import LMStatistics


@attrs.frozen
class WorkerStatistics:
    """A snapshot of one worker."""

    worker_id: str
    """The runtime's name for it (``w1``, ``w2``, ...)."""
    pid: int
    """Its process id."""
    state: WorkerState
    """Its state (see ``dspex_trio._states``)."""
    in_flight: int
    """Calls sent and not yet finished."""
    capacity: int
    """Calls it runs at once."""
    calls_served: int
    """Calls that ended with a result."""
    calls_failed: int
    """Calls that ended with an error (from the worker, a timeout, or its death)."""
    late_frames: int
    """Frames for abandoned (timed out or cancelled) calls, dropped."""
    restarts: int = 0
    """Times its pool slot replaced a worker (0 for a standalone worker)."""
    launcher: str = ""
    """Which launcher started it."""
    node: str = ""
    """Where it runs when not on this machine (the Ray node id of a worker on a cluster), else ""."""


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


@attrs.frozen
class LatencySummary:
    """Latencies of the latest calls of one method, in seconds."""

    count: int
    """Calls measured in the window."""
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: Collection[float]) -> LatencySummary:
        """The summary of ``samples`` (nearest-rank percentiles; all 0 for none)."""
        if not samples:
            return cls(count=0, p50=0.0, p90=0.0, p99=0.0, max=0.0)
        ordered = sorted(samples)
        return cls(
            count=len(ordered),
            p50=_percentile(ordered, 0.50),
            p90=_percentile(ordered, 0.90),
            p99=_percentile(ordered, 0.99),
            max=ordered[-1],
        )


@attrs.frozen
class PoolStatistics:
    """A snapshot of the pool."""

    workers: tuple[WorkerStatistics, ...]
    """Each live worker (retiring ones included)."""
    size: int
    """Configured worker slots."""
    ready: int
    """Workers taking calls now."""
    in_flight: int
    """Calls running on workers."""
    queued: int
    """Calls waiting for a worker."""
    calls: int
    """Calls admitted since the pool opened."""
    completed: int
    failed: int
    overloaded: int
    """Calls refused with ``Overloaded``."""
    unavailable: int
    """Calls refused with ``PoolUnavailable`` (circuit open)."""
    redispatched: int
    """Calls re-sent after their worker died before acking them."""
    retried: int
    """Idempotent calls retried on another worker after their worker died."""
    backoffs: int
    """Waits before a re-dispatch or retry (see ``retry_backoff``)."""
    backoff_seconds: float
    """Total time calls spent in those waits, in seconds."""
    restarts: int
    """Workers replaced after failing."""
    recycled: int
    """Workers replaced by recycling (call count or memory)."""
    launcher: str
    """Launcher in use ("zygote" or "subprocess", with the reason for a fallback)."""
    circuit: CircuitState
    circuit_reason: str
    circuit_opened: int
    """Times the circuit opened (trips and failed probes)."""
    checkout_success_rate: float
    """Share of checkouts that got a worker (1.0 when none was attempted)."""
    sessions: int
    latency: dict[str, LatencySummary]
    """Per method."""
    lm: tuple[LMStatistics, ...] = ()
    """Each LM's budgets and throttling (``open_pool(lm_budgets=...)``; empty when the pool has none)."""


@attrs.frozen
class BackendStatistics:
    """A snapshot of a ``mock`` or ``bridge`` backend."""

    backend: str
    calls: int
    """Calls admitted."""
    completed: int
    failed: int
    unavailable: int
    """Calls refused with ``PoolUnavailable``."""
    restarts: int
    """Worker replacements (bridge)."""
    retried: int
    """Re-sent calls (bridge: never-acked calls and idempotent ones after the worker died, and calls its
    worker refused while closing)."""
    sessions: int
    circuit: CircuitState


@attrs.frozen
class FallbackStatistics:
    """A snapshot of a fallback chain."""

    backend: str | None
    """The backend that served the latest call (``last_backend``)."""
    chain: tuple[str, ...]
    """The backends in order of preference (those that started)."""
    skipped: dict[str, str]
    """Backends that could not start, with why."""
    served: dict[str, int]
    """Calls served, per backend."""
    fallbacks: int
    """Calls served by a backend other than the first of the chain."""
    switches: int
    """Times the serving backend changed."""
    backends: dict[str, Any]
    """Each backend's own statistics."""
