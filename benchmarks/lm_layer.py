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
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.dspy_exec import FakeLMProcess

PREDICT = {"signature": "question -> answer", "module": "predict"}
RSS_SAMPLE_S = 0.5
"""Seconds between two samples of the workers' RSS."""


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
    return {"rows": rows, "errors": errors, "facts": facts}
