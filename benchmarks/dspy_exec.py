"""Scenario 6 of ``python -m benchmarks``: DSPy executions (ChainOfThought ``question -> answer``).

- **CPU-bound**, offline LM (``bridge_child._offline_lm``, no network): a 2-worker pool driven by 16
  concurrent callers (``pool_2w``: enough that each worker still has calls queued while its last results
  travel back, i.e. the pool's throughput) and by 8 (``pool_2w_8_callers``, shown, no target) vs the
  same program run in-process on one thread (``dspy.context(lm=offline_lm())``, exactly as a worker's
  ``execute`` runs it). Target: ``pool_2w`` >= 70 % of 2x the single-thread rate.
- **I/O-bound**, ``python -m dspex_trio fake-lm --latency 0.1`` in a separate process (so it does not
  share the benchmark's event loop or its core): concurrency 1, 16, 64, 256 callers on a 2-worker pool.
  The CPU ceiling is the same at concurrency 256 against a second fake-lm with no latency. The ideal at a
  concurrency is ``min(calls in flight / latency, CPU ceiling)``, calls in flight being the concurrency
  capped by the pool's capacity (workers x per-worker capacity).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks._common import summarize_run

COT = {"signature": "question -> answer", "module": "chain_of_thought"}
MAX_CALLS = 200_000
"""Every timed loop also stops after this many calls."""


def single_thread_rate(seconds: float, warmup: int = 20) -> dict[str, float]:
    """Executions/s of the program in this process, on this thread, with the offline LM."""
    import dspy

    from bridge_child._offline_lm import offline_lm
    from bridge_child._programs import _import_dspy, materialize

    _import_dspy()
    program = materialize(COT)
    lm = offline_lm()

    def once(i: int) -> None:
        with dspy.context(lm=lm, adapter=dspy.ChatAdapter(), track_usage=True, disable_history=True):
            prediction = program.module(question=f"What is item {i}?")
        assert prediction.answer

    for i in range(warmup):
        once(i)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline and n < MAX_CALLS:
        once(n)
        n += 1
    return {"rate": n / (time.perf_counter() - t0), "calls": n}


async def drive(
    call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float, warmup: int = 0
) -> dict[str, Any]:
    """``concurrency`` tasks calling ``call`` back to back until ``seconds`` have passed (and at most
    MAX_CALLS calls); rate over the whole time (the last calls included), latencies."""
    import trio

    if warmup:
        async with trio.open_nursery() as nursery:
            for k in range(min(warmup, concurrency)):
                nursery.start_soon(call, -1 - k)
    latencies: list[float] = []
    errors: list[str] = []
    counter = [0]
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline and counter[0] < MAX_CALLS:
            counter[0] += 1
            start = time.perf_counter()
            try:
                await call(counter[0])
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(caller)
    elapsed = time.perf_counter() - t0
    return summarize_run(latencies, errors, elapsed)


async def pool_cpu_rate(seconds: float, concurrency: int) -> dict[str, Any]:
    import dspex_trio

    async with dspex_trio.open_pool(workers=2) as pool:
        pid = await pool.create_program(COT["signature"], module=COT["module"])

        async def call(i: int) -> Any:
            return await pool.execute(pid, {"question": f"What is item {i}?"})

        return await drive(call, concurrency, seconds, warmup=concurrency)


class FakeLMProcess:
    """``python -m dspex_trio fake-lm --port 0 --latency L`` in its own process; ``url`` once it listens."""

    def __init__(self, latency: float, max_connections: int | None = None) -> None:
        extra = [] if max_connections is None else ["--max-connections", str(max_connections)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dspex_trio", "fake-lm", "--port", "0", "--latency", str(latency), *extra],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            self.close()
            raise RuntimeError("fake-lm did not start")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def pool_io_rates(url: str, concurrencies: list[int], seconds: float) -> dict[int, dict[str, Any]]:
    import dspex_trio

    out: dict[int, dict[str, Any]] = {}
    async with dspex_trio.open_pool(workers=2) as pool:
        await pool.configure_lm("openai/fake", api_base=url, api_key="x", num_retries=0)
        pid = await pool.create_program(COT["signature"], module=COT["module"])

        async def call(i: int) -> Any:
            return await pool.execute(pid, {"question": f"What is item {i}?"})

        await drive(call, 64, 0.5, warmup=64)  # connections opened, threads started
        for c in concurrencies:
            out[c] = await drive(call, c, seconds)
    return out


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    from dspex_trio._launcher import DEFAULT_CAPACITY

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    facts: dict[str, Any] = {}
    seconds = spec["seconds"]
    for part in spec["implementations"]:
        try:
            if part == "cpu":
                single = single_thread_rate(seconds)
                saturating, *others = spec["cpu_concurrency"]
                got = trio.run(pool_cpu_rate, seconds, saturating)
                also = {c: trio.run(pool_cpu_rate, seconds, c) for c in others}
                facts["cpu"] = {"single": single, "pool": got, "pool_at": also}
                ideal = 2 * single["rate"]
                base: dict[str, Any] = {
                    "scenario": "6_dspy_cpu",
                    "metric": "executions_per_s",
                    "unit": "exec/s",
                }
                rows.append(
                    {
                        **base,
                        "implementation": "in_process_1_thread",
                        "value": single["rate"],
                        "description": "the program in-process, one thread, offline LM",
                    }
                )
                rows.append(
                    {
                        **base,
                        "implementation": "2x_in_process_1_thread",
                        "value": ideal,
                        "description": "twice the single-thread rate: the ideal of 2 workers",
                    }
                )
                rows.append(
                    {
                        **base,
                        "implementation": "pool_2w",
                        "value": got["rate"],
                        "description": f"open_pool(workers=2).execute, {saturating} callers, offline LM",
                        "p50_ms": got["p50_ms"],
                    }
                )
                for c, other in also.items():
                    rows.append(
                        {
                            **base,
                            "implementation": f"pool_2w_{c}_callers",
                            "value": other["rate"],
                            "description": f"open_pool(workers=2).execute, {c} callers, offline LM",
                            "p50_ms": other["p50_ms"],
                        }
                    )
                for c, run in ((saturating, got), *also.items()):
                    if run["errors"]:
                        errors.append(
                            f"dspy_cpu c={c}: {run['errors']} failed executions ({run['first_error']})"
                        )
            else:
                latency = spec["latency"]
                fake = FakeLMProcess(latency)
                try:
                    got_io = trio.run(pool_io_rates, fake.url, spec["concurrency"], seconds)
                finally:
                    fake.close()
                fake0 = FakeLMProcess(0.0)
                try:
                    top = max(spec["concurrency"])
                    ceiling = trio.run(pool_io_rates, fake0.url, [top], seconds)[top]
                finally:
                    fake0.close()
                facts["io"] = {"latency_s": latency, "runs": got_io, "ceiling": ceiling}
                capacity = 2 * DEFAULT_CAPACITY
                rows.append(
                    {
                        "scenario": "6_dspy_io",
                        "implementation": "cpu_ceiling",
                        "metric": "executions_per_s",
                        "x": top,
                        "value": ceiling["rate"],
                        "unit": "exec/s",
                        "description": f"2-worker pool, fake-lm with no latency, {top} callers",
                    }
                )
                for c, r in got_io.items():
                    ideal = min(min(c, capacity) / latency, ceiling["rate"])
                    base = {"scenario": "6_dspy_io", "x": c, "unit": "exec/s"}
                    rows.append(
                        {
                            **base,
                            "implementation": "pool_2w",
                            "metric": "executions_per_s",
                            "value": r["rate"],
                            "p50_ms": r["p50_ms"],
                            "p99_ms": r["p99_ms"],
                            "description": f"2-worker pool, fake-lm at {latency * 1000:.0f} ms (separate process), "
                            f"{c} callers",
                        }
                    )
                    rows.append(
                        {
                            **base,
                            "implementation": "ideal",
                            "metric": "executions_per_s",
                            "value": ideal,
                            "description": f"min(min(callers, capacity {capacity}) / latency, CPU ceiling)",
                        }
                    )
                    if r["errors"]:
                        errors.append(f"dspy_io c={c}: {r['errors']} failed executions ({r['first_error']})")
        except Exception as exc:
            errors.append(f"dspy/{part}: {type(exc).__name__}: {exc}")
    return {"rows": rows, "errors": errors, "facts": {"dspy": facts, "pid": os.getpid()}}
