"""Scenario 12 of ``python -m benchmarks``: many LM requests in flight at once (issue 17).

``in_flight`` executions (Predict ``question -> answer``) are started at once on a 2-worker pool against
``python -m dspex_trio fake-lm --latency L`` in its own process. The ideal throughput is
``in_flight / L``: every execution waiting on the LM at the same time. Measured: executions completed
over the time until all completed (cut at ``2 L``: what is still running then is cancelled and counted
as not completed), and the growth of the workers' RSS (their sum, sampled every 0.5 s, peak minus
before).

Implementations (the worker's thread-per-call LM path is the only one built; the asynchronous path of
the issue, thousands of requests per worker without a thread each, is not):

- ``threads_default``: the default worker capacity (64 calls, so 128 in flight on 2 workers; the rest
  queue in the pool, whose queue is raised to hold them all);
- ``threads_wide``: the worker capacity raised to ``in_flight / 2`` (one thread per execution); lm15's
  client opens at most 100 connections per LM per worker, which caps it further;
- ``ideal``: ``in_flight / L``.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.dspy_exec import FakeLMProcess

PREDICT = {"signature": "question -> answer", "module": "predict"}
RSS_SAMPLE_S = 0.5
"""Seconds between two samples of the workers' RSS."""


async def run_in_flight(url: str, in_flight: int, latency: float, capacity: int) -> dict[str, Any]:
    import trio

    import dspex_trio

    async with dspex_trio.open_pool(workers=2, capacity=capacity, max_queue=in_flight) as pool:
        await pool.configure_lm("openai/fake", api_base=url, api_key="x", num_retries=0)
        pid = await pool.create_program(PREDICT["signature"], module=PREDICT["module"])

        async def rss() -> int:
            return sum([int((await w.call("stats"))["rss_bytes"]) for w in pool.workers()])

        before = await rss()
        peak = before
        done = 0
        errors: list[str] = []

        async def one(i: int) -> None:
            nonlocal done
            try:
                await pool.execute(pid, {"question": f"What is item {i}?"})
            except dspex_trio.DspexError as exc:
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            done += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as executions:
                for i in range(in_flight):
                    executions.start_soon(one, i)

                async def sample() -> None:
                    nonlocal peak
                    while True:
                        await trio.sleep(RSS_SAMPLE_S)
                        peak = max(peak, await rss())

                nursery.start_soon(sample)
                executions.cancel_scope.deadline = trio.current_time() + 2 * latency
            elapsed = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
    return {
        "completed": done,
        "elapsed_s": round(elapsed, 2),
        "rate": done / elapsed if elapsed else 0.0,
        "rss_growth_mb": round((peak - before) / 2**20, 1),
        "errors": errors,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    in_flight, latency = spec["in_flight"], spec["latency"]
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
    fake = FakeLMProcess(latency)
    try:
        for impl in spec["implementations"]:
            capacity = 64 if impl == "threads_default" else max(1, in_flight // 2)
            try:
                got = trio.run(run_in_flight, fake.url, in_flight, latency, capacity)
            except Exception as exc:
                errors.append(f"{impl}: {type(exc).__name__}: {exc}"[:300])
                continue
            facts[impl] = got
            errors += [f"{impl}: {e}" for e in got["errors"]]
            rows.append(
                {
                    **base,
                    "implementation": impl,
                    "metric": "executions_per_s",
                    "value": got["rate"],
                    "unit": "exec/s",
                    "description": f"2 workers, capacity {capacity} each, thread per call",
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
