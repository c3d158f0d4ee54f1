"""Call counters and latency histograms, kept as plain integer increments on the call path.

The Prometheus collector (``_metrics.py``) reads most figures at scrape time from ``statistics()``; what
cannot be derived then (how many calls of each method ended with each outcome, and the distribution of
their durations) is counted here, by the dispatch loop (``_dispatch.py``), when a call ends: one dict
increment and one ``bisect`` per call, no allocation once a method has been seen, no prometheus-client
import. Histograms, not windowed percentiles, so that they aggregate across servers.

Label values are bounded: at most ``MAX_METHODS`` distinct method names are kept (later ones count as
``other``); outcomes are ``ok``, ``cancelled`` or the name of a :class:`~dspex_trio.DspexError` subclass
(``error`` for anything else), a closed set.
"""

from __future__ import annotations

import bisect
import collections
from typing import Final

import attrs
import trio

from dspex_trio._errors import DspexError

__all__ = ["LATENCY_BUCKETS_S", "MAX_METHODS", "CallMetrics", "MethodHistogram", "outcome_of"]

LATENCY_BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds of the call-duration histogram's buckets, in seconds (``+Inf`` is implied)."""
MAX_METHODS: Final = 64
"""Distinct method names counted apart; calls of any later one count under ``other``."""
OTHER_METHOD: Final = "other"


def outcome_of(error: BaseException) -> str:
    """The ``outcome`` label of a call that ended with ``error``."""
    if isinstance(error, trio.Cancelled):
        return "cancelled"
    if isinstance(error, DspexError):
        return type(error).__name__
    return "error"


@attrs.define(eq=False)
class MethodHistogram:
    """Call durations of one method: per-bucket counts (not cumulative), their sum and count."""

    buckets: list[int] = attrs.Factory(lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    """``buckets[i]``: calls with ``LATENCY_BUCKETS_S[i-1] < duration <= LATENCY_BUCKETS_S[i]``; the last
    one is ``+Inf``."""
    total_seconds: float = 0.0
    count: int = 0

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs as Prometheus writes them, ``+Inf`` last."""
        pairs: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(str, LATENCY_BUCKETS_S), "+Inf"), self.buckets, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs


@attrs.define(eq=False)
class CallMetrics:
    """Calls by method and outcome, and a duration histogram per method (see the module doc)."""

    outcomes: collections.Counter[tuple[str, str]] = attrs.Factory(collections.Counter)
    """``(method, outcome) -> calls``."""
    histograms: dict[str, MethodHistogram] = attrs.Factory(dict)

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        """A call of ``method`` ended with ``outcome`` after ``seconds``."""
        histogram = self.histograms.get(method)
        if histogram is None:
            if len(self.histograms) >= MAX_METHODS:
                method = OTHER_METHOD
            histogram = self.histograms.setdefault(method, MethodHistogram())
        histogram.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        histogram.total_seconds += seconds
        histogram.count += 1
        self.outcomes[method, outcome] += 1
