"""Scenario 12 of ``python -m benchmarks``: many LM requests in flight at once (issue 17).

``in_flight`` callers run Predict ``question -> answer`` executions back to back on a 2-worker pool
against ``python -m dspex_trio fake-lm --latency L`` in its own process. The ideal throughput is
``in_flight / L`` (every execution waiting on the LM at the same time). Measured in steady state:
executions completed within ``window`` seconds (default ``2 L``) after a warm-up of ``L`` (the first
answers arrive then), and the
growth of the workers' RSS (their sum, sampled every 0.5 s: peak minus before the run).

Implementations:

- ``async``: the worker's asynchronous lane (``WorkerOptions(async_capacity=in_flight // 2)``): DSPy's
  async API on an event loop of the worker's own, no thread per execution;
- ``threads``: the thread-per-call path as configured by default (capacity 64 per worker, so 128 in
  flight on 2 workers; the other callers wait in the pool's queue, raised to hold them);
- ``ideal``: ``in_flight / L``.

With ``spec["cancel"]`` (``{implementation: in_flight}``), scenario ``12_lm_cancel`` too: that many
executions in flight on 2 workers against ``fake-lm --latency 30`` (its own process), all cancelled at
once by their nursery; rows: milliseconds from the cancel to each connection closed as ``fake-lm``
stamps it (p50, p99, max). ``async`` runs on the asynchronous lane, ``threads`` on the thread path (at
most 64 per worker there).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.dspy_exec import FakeLMProcess

PREDICT = {"signature": "question -> answer", "module": "predict"}
RSS_SAMPLE_S = 0.5
"""Seconds between two samples of the workers' RSS."""
CANCEL_LATENCY_S = 30.0
"""``fake-lm``'s latency for the cancel scenario, in seconds: nothing is answered before the cancel."""
CANCEL_WAIT_S = 60.0
"""Longest wait for every execution to be in flight, then for every connection to close, in seconds."""


def _fake_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/stats", timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


async def _until(
    read: Callable[[], Awaitable[dict[str, Any]]], done: Callable[[dict[str, Any]], bool], every_s: float
) -> dict[str, Any]:
    """Read ``read()`` every ``every_s`` seconds until ``done`` holds for it; that last reading."""
    import trio

    while True:
        seen = await read()
        if done(seen):
            return seen
        await trio.sleep(every_s)


async def cancel_delays(url: str, in_flight: int, async_capacity: int) -> dict[str, Any]:
    """Put ``in_flight`` executions in flight, cancel them all at once, and return how long each
    connection took to close, as ``fake-lm`` saw it (seconds after the cancel, sorted)."""
    import trio

    import dspex_trio

    async def stats() -> dict[str, Any]:
        return await trio.to_thread.run_sync(_fake_stats, url)

    before = (await stats())["client_disconnects"]
    async with dspex_trio.open_pool(workers=2, async_capacity=async_capacity, max_queue=in_flight) as pool:
        await pool.configure_lm("openai/fake", api_base=url, api_key="x", num_retries=0)
        pid = await pool.create_program(PREDICT["signature"], module=PREDICT["module"])
        with trio.fail_after(CANCEL_WAIT_S):
            async with trio.open_nursery() as nursery:
                for i in range(in_flight):
                    nursery.start_soon(pool.execute, pid, {"question": f"q{i}"})
                await _until(stats, lambda s: s["completions_in_flight"] >= in_flight, 0.1)
                cancelled_at = time.monotonic()
                nursery.cancel_scope.cancel()
            seen = await _until(stats, lambda s: s["client_disconnects"] >= before + in_flight, 0.05)
    delays = sorted(t - cancelled_at for t in seen["disconnect_times"] if t >= cancelled_at)
    return {"delays": delays, "closed": len(delays)}


async def steady_rate(
    url: str, in_flight: int, latency: float, window_s: float, async_capacity: int
) -> dict[str, Any]:
    import trio

    import dspex_trio

    async with dspex_trio.open_pool(workers=2, async_capacity=async_capacity, max_queue=in_flight) as pool:
        await pool.configure_lm("openai/fake", api_base=url, api_key="x", num_retries=0)
        pid = await pool.create_program(PREDICT["signature"], module=PREDICT["module"])

        async def rss() -> int:
            return sum([int((await w.call("stats"))["rss_bytes"]) for w in pool.workers()])

        before = await rss()
        peak = before
        window: list[float] = []  # [start, end] of the measured window, perf_counter
        counted = 0
        errors: list[str] = []

        async def caller(k: int) -> None:
            nonlocal counted
            i = 0
            while True:
                i += 1
                try:
                    await pool.execute(pid, {"question": f"What is item {k}.{i}?"})
                except dspex_trio.DspexError as exc:
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    await trio.sleep(0.1)
                    continue
                now = time.perf_counter()
                if window and window[0] <= now < window[1]:
                    counted += 1

        async def sample() -> None:
            nonlocal peak
            while True:
                await trio.sleep(RSS_SAMPLE_S)
                peak = max(peak, await rss())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            for k in range(in_flight):
                nursery.start_soon(caller, k)
            await trio.sleep(latency)  # warm-up: every caller's first request is out
            start = time.perf_counter()
            window[:] = [start, start + window_s]
            await trio.sleep(window_s)
            nursery.cancel_scope.cancel()
    return {
        "completed": counted,
        "rate": counted / window_s,
        "rss_growth_mb": round((peak - before) / 2**20, 1),
        "errors": errors,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    in_flight, latency = spec["in_flight"], spec["latency"]
    window_s = spec.get("window", 2 * latency)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    facts: dict[str, Any] = {}
    base = {"scenario": "12_lm_in_flight", "x": in_flight}
    rows.append(
        {
            **base,
            "implementation": "ideal",
            "metric": "executions_per_s",
            "value": in_flight / latency,
            "unit": "exec/s",
            "description": f"{in_flight} in flight / {latency:g} s latency",
        }
    )
    fake = FakeLMProcess(latency, max_connections=2 * in_flight + 64)
    try:
        for impl in spec["implementations"]:
            async_capacity = max(1, in_flight // 2) if impl == "async" else 0
            try:
                got = trio.run(steady_rate, fake.url, in_flight, latency, window_s, async_capacity)
            except Exception as exc:
                errors.append(f"{impl}: {type(exc).__name__}: {exc}"[:300])
                continue
            facts[impl] = got
            errors += [f"{impl}: {e}" for e in got["errors"]]
            what = "asynchronous lane" if async_capacity else "thread per call, capacity 64 per worker"
            rows.append(
                {
                    **base,
                    "implementation": impl,
                    "metric": "executions_per_s",
                    "value": got["rate"],
                    "unit": "exec/s",
                    "description": f"2 workers, {what}",
                    "completed": got["completed"],
                }
            )
            rows.append(
                {
                    **base,
                    "implementation": impl,
                    "metric": "worker_rss_growth",
                    "value": got["rss_growth_mb"],
                    "unit": "MB",
                    "description": "sum of the 2 workers' RSS, peak minus before",
                }
            )
    finally:
        fake.close()
    if spec.get("cancel"):
        rows += _measure_cancel(spec["cancel"], errors, facts)
    return {"rows": rows, "errors": errors, "facts": facts}


def _measure_cancel(cancel: dict[str, int], errors: list[str], facts: dict[str, Any]) -> list[dict[str, Any]]:
    import trio

    rows: list[dict[str, Any]] = []
    most = max(cancel.values())
    fake = FakeLMProcess(CANCEL_LATENCY_S, max_connections=2 * most + 64)
    try:
        for impl, in_flight in cancel.items():
            async_capacity = in_flight if impl == "async" else 0
            try:
                got = trio.run(cancel_delays, fake.url, in_flight, async_capacity)
            except Exception as exc:
                errors.append(f"cancel {impl}: {type(exc).__name__}: {exc}"[:300])
                continue
            delays = got["delays"]
            if len(delays) < in_flight:
                errors.append(f"cancel {impl}: {len(delays)} of {in_flight} connections closed")
                continue
            facts[f"cancel_{impl}"] = {"in_flight": in_flight, "closed": got["closed"]}
            what = "asynchronous lane" if async_capacity else "thread per call"
            figures = {
                "p50": statistics.median(delays),
                "p99": delays[int(0.99 * (len(delays) - 1))],
                "max": delays[-1],
            }
            for metric, value in figures.items():
                rows.append(
                    {
                        "scenario": "12_lm_cancel",
                        "x": in_flight,
                        "implementation": impl,
                        "metric": metric,
                        "value": round(value * 1000, 1),
                        "unit": "ms",
                        "description": f"cancel to connection closed as fake-lm saw it, 2 workers, {what}",
                    }
                )
    finally:
        fake.close()
    return rows
