"""Family 11 of ``python -m benchmarks``: what monitoring costs (issue 18).

- ``11_scrape``: one Prometheus scrape of a pool of 64 real workers (zygote), in ms: ``collector``
  (``render_metrics(RuntimeCollector(pool))``: statistics, health, /proc for each worker's RSS and age,
  the text format), ``http`` (``GET /metrics`` over loopback on the websocket's port: the same plus the
  request, the routes' checks and the socket), beside ``statistics`` (``pool.statistics()`` and
  ``pool.health()`` alone: what any status page pays) as the anchor. Target: ``collector`` p50 < 5 ms.
- ``11_noop_metrics``: no-op throughput (64 callers, ``pool.call("echo")``, 2 workers), ``metrics_on``
  (the call path's counting, plus a scrape every ``SCRAPE_INTERVAL_S``) against ``metrics_off`` (the
  call path's counting switched off on that pool, no collector), many short runs alternating on, off,
  off, on, ... in one process; ``ratio_to_off`` is the median of the ratios of neighbouring on and off
  runs, which should be 1 within the noise.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Final

from benchmarks._common import check, percentile, run_one
from benchmarks.roundtrip import _callers

SCRAPE_INTERVAL_S: Final = 0.5
"""How often ``metrics_on`` scrapes while the callers run (Prometheus' default is every 15 s)."""
NOOP_WORKERS: Final = 2


async def _scrape_costs(workers: int, scrapes: int) -> dict[str, list[float]]:
    """Seconds per scrape, per implementation, on one pool of ``workers`` real workers."""
    from functools import partial

    import trio

    import dspex_trio
    from dspex_trio._metrics import RuntimeCollector, render_metrics

    out: dict[str, list[float]] = {"statistics": [], "collector": [], "http": []}
    pc = time.perf_counter
    async with (
        dspex_trio.open_pool(workers=workers, launcher="zygote") as pool,
        trio.open_nursery() as nursery,
    ):
        server = await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0, http_routes=True))
        collector = RuntimeCollector(pool)
        request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

        async def http_scrape() -> bytes:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(request)
                body = b""
                while data := await stream.receive_some():
                    body += data
            return body

        for _ in range(5):  # warm up (imports, first /proc reads)
            render_metrics(collector)
            await http_scrape()
        assert len(pool.workers()) == workers
        gc.collect()
        for _ in range(scrapes):
            t0 = pc()
            pool.statistics()
            pool.health()
            out["statistics"].append(pc() - t0)
            t0 = pc()
            body, _ = render_metrics(collector)
            out["collector"].append(pc() - t0)
            check(body.count(b"dspex_worker_resident_memory_bytes{"), workers)
            t0 = pc()
            answer = await http_scrape()
            out["http"].append(pc() - t0)
            check(answer.startswith(b"HTTP/1.1 200 "), True)
        nursery.cancel_scope.cancel()
    return out


async def _noop_pair(warmup: int, total: int, pairs: int) -> dict[str, list[float]]:
    """Calls/s of ``pairs`` alternating runs with metrics on and off, on one pool."""
    import trio

    import dspex_trio
    from dspex_trio._metrics import RuntimeCollector, render_metrics

    out: dict[str, list[float]] = {"metrics_on": [], "metrics_off": []}
    async with dspex_trio.open_pool(workers=NOOP_WORKERS, diagnostics=True, launcher="zygote") as pool:

        async def call(value: int) -> Any:
            return await pool.call("echo", {"value": value})

        counting = pool._record_outcome
        collector = RuntimeCollector(pool)
        for i in range(2 * pairs):
            on = i % 4 in (0, 3)  # on, off, off, on, ...: a drift of the machine's load cancels out
            if on:
                pool._record_outcome = counting  # type: ignore[method-assign]
                async with trio.open_nursery() as nursery:

                    async def scraper() -> None:
                        while True:
                            await trio.sleep(SCRAPE_INTERVAL_S)
                            render_metrics(collector)

                    nursery.start_soon(scraper)
                    out["metrics_on"].append(await _callers(call, warmup, total))
                    nursery.cancel_scope.cancel()
            else:
                pool._record_outcome = lambda method, outcome, seconds: None  # type: ignore[method-assign]
                out["metrics_off"].append(await _callers(call, warmup, total))
    return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One round: the scrape costs, then the no-op pairs."""
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    workers = spec["workers"]
    if "scrape" in spec["implementations"]:
        try:
            costs = run_one(_scrape_costs, "trio", workers, spec["scrapes"], time_limit=spec["time_limit"])
        except Exception as exc:
            errors.append(f"scrape: {type(exc).__name__}: {exc}")
        else:
            for name, seconds in costs.items():
                base = {"scenario": "11_scrape", "implementation": name, "workers": workers, "unit": "ms"}
                rows.append({**base, "metric": "p50", "value": statistics.median(seconds) * 1000})
                rows.append({**base, "metric": "p99", "value": percentile(seconds, 99) * 1000})
    if "noop" in spec["implementations"]:
        os.sched_setaffinity(0, set(spec["cpus"]))
        try:
            rates = run_one(
                _noop_pair,
                "trio",
                spec["warmup"],
                spec["calls"],
                spec["pairs"],
                time_limit=spec["time_limit"],
            )
        except Exception as exc:
            errors.append(f"noop: {type(exc).__name__}: {exc}")
        else:
            # the runs went on, off, off, on, on, off, ...: the k-th on run and the k-th off run are
            # neighbours in time, so their ratio is what a drift of the machine's load disturbs least
            ratios = [on / off for on, off in zip(rates["metrics_on"], rates["metrics_off"], strict=True)]
            rows.append(
                {
                    "scenario": "11_noop_metrics",
                    "implementation": "metrics_on",
                    "workers": NOOP_WORKERS,
                    "metric": "ratio_to_off",
                    "value": statistics.median(ratios),
                    "unit": "x",
                    "spread": [round(min(ratios), 3), round(max(ratios), 3)],
                }
            )
            for name, values in rates.items():
                rows.append(
                    {
                        "scenario": "11_noop_metrics",
                        "implementation": name,
                        "workers": NOOP_WORKERS,
                        "metric": "calls_per_s",
                        "value": statistics.median(values),
                        "unit": "calls/s",
                        "spread": [round(min(values)), round(max(values))],
                    }
                )
    return {"rows": rows, "errors": errors, "facts": {}}
