"""Scenarios 1 and 2 of ``python -m benchmarks``: a no-op call, round trip (one caller) and throughput (64
callers), dspex-trio beside the floors and its peers.

The raw floors and most peers come from :mod:`benchmarks.roundtrip`; this module adds ``pool.call``,
``ProcessPoolExecutor``, a multiplexed Trio raw pipe and the DSPex-way baseline (scenario 8).
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from benchmarks import _common
from benchmarks._common import check, close_child, run_one, summarize_latencies
from benchmarks.roundtrip import (
    CALLERS,
    READ_CHUNK,
    _callers,
    _tp_anyio,
    _tp_trio_parallel,
    identity,
    pop_reply,
    raw_child_argv,
    raw_frame,
    rt_anyio,
    rt_open_worker,
    rt_raw_pipe,
    rt_trio_parallel,
    rt_trio_pipe,
    tp_open_worker,
    tp_raw_pipelined,
)

SPAWN_WORKERS = 2
"""Workers of every multi-worker row of the throughput scenario."""


# -- round trip: per-call latencies in ns ----------------------------------------------------------------
async def rt_pool(warmup: int, n: int) -> list[int]:
    """``open_pool(workers=1, diagnostics=True)`` (zygote launcher), ``await pool.call("echo", ...)``."""
    import dspex_trio

    pc = time.perf_counter_ns
    async with dspex_trio.open_pool(workers=1, diagnostics=True, launcher="zygote") as pool:
        for i in range(warmup):
            check(await pool.call("echo", {"value": i}), i)
        gc.collect()
        out = []
        for i in range(n):
            t0 = pc()
            value = await pool.call("echo", {"value": i})
            out.append(pc() - t0)
            check(value, i)
        return out


def _ppe(workers: int) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


async def rt_ppe(warmup: int, n: int) -> list[int]:
    """``loop.run_in_executor(ProcessPoolExecutor(1, spawn), identity, i)`` under asyncio."""
    import asyncio

    loop = asyncio.get_running_loop()
    pc = time.perf_counter_ns
    with _ppe(1) as ex:
        for i in range(warmup):
            check(await loop.run_in_executor(ex, identity, i), i)
        gc.collect()
        out = []
        for i in range(n):
            t0 = pc()
            value = await loop.run_in_executor(ex, identity, i)
            out.append(pc() - t0)
            check(value, i)
        return out


async def rt_dspex_way(warmup: int, n: int) -> list[int]:
    """The DSPex-way baseline: one cold worker, JSON lines, check-out."""
    from benchmarks.dspex_way import open_dspex_way_pool

    pc = time.perf_counter_ns
    async with open_dspex_way_pool(1, import_dspy=False) as pool:
        for i in range(warmup):
            check(await pool.call("echo", {"value": i}), i)
        gc.collect()
        out = []
        for i in range(n):
            t0 = pc()
            value = await pool.call("echo", {"value": i})
            out.append(pc() - t0)
            check(value, i)
        return out


# -- throughput: calls/s of `total` calls from CALLERS callers -------------------------------------------
async def tp_trio_pipe(warmup: int, total: int) -> float:
    """The Trio floor, multiplexed: 64 tasks share one raw child; a lock serialises writes, one reader
    task routes replies by id."""
    import trio

    proc = await trio.lowlevel.open_process(raw_child_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    lock = trio.StrictFIFOLock()
    waiting: dict[int, list[Any]] = {}
    ids = iter(range(1, 1 << 62))

    async def reader() -> None:
        buf = bytearray()
        while True:
            data = await stdout.receive_some(READ_CHUNK)
            if not data:
                return
            buf.extend(data)
            while (reply := pop_reply(buf)) is not None:
                slot = waiting.pop(reply[0])
                slot[1] = reply[1]
                slot[0].set()

    async def call(value: int) -> Any:
        cid = next(ids)
        slot: list[Any] = [trio.Event(), None]
        waiting[cid] = slot
        async with lock:
            await stdin.send_all(raw_frame(cid, value))
        await slot[0].wait()
        return slot[1]

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            rate = await _callers(call, warmup, total)
            nursery.cancel_scope.cancel()
        return rate
    finally:
        await close_child(proc, stdin, stdout)


async def tp_pool(warmup: int, total: int) -> float:
    import dspex_trio

    async with dspex_trio.open_pool(workers=SPAWN_WORKERS, diagnostics=True, launcher="zygote") as pool:

        async def call(value: int) -> Any:
            return await pool.call("echo", {"value": value})

        return await _callers(call, warmup, total)


async def tp_ppe(warmup: int, total: int) -> float:
    import asyncio

    loop = asyncio.get_running_loop()
    with _ppe(SPAWN_WORKERS) as ex:

        async def call(value: int) -> Any:
            return await loop.run_in_executor(ex, identity, value)

        return await _callers(call, warmup, total)


async def tp_dspex_way(warmup: int, total: int) -> float:
    from benchmarks.dspex_way import open_dspex_way_pool

    async with open_dspex_way_pool(SPAWN_WORKERS, import_dspy=False) as pool:

        async def call(value: int) -> Any:
            return await pool.call("echo", {"value": value})

        return await _callers(call, warmup, total)


# name -> (function, how it runs, workers, description)
Impl = tuple[Callable[..., Any], str, int, str]
ROUND_TRIP: dict[str, Impl] = {
    "raw_pipe": (
        rt_raw_pipe,
        "sync",
        1,
        "the floor: blocking parent + blocking child, 6-byte header + msgpack",
    ),
    "trio_pipe": (rt_trio_pipe, "trio", 1, "Trio parent, one task, trio.lowlevel.open_process, same child"),
    "open_worker": (rt_open_worker, "trio", 1, 'dspex_trio.open_worker(diagnostics=True).call("echo")'),
    "pool": (rt_pool, "trio", 1, 'open_pool(workers=1, launcher="zygote").call("echo")'),
    "trio_parallel": (rt_trio_parallel, "trio", 1, "trio_parallel.run_sync (spawn), limiter 1"),
    "process_pool_executor": (rt_ppe, "asyncio", 1, "ProcessPoolExecutor(1, spawn) via run_in_executor"),
    "anyio_to_process": (rt_anyio, "trio", 1, "anyio.to_process.run_sync, trio backend, limiter 1"),
    "dspex_way": (rt_dspex_way, "trio", 1, "DSPex way: cold worker, JSON lines, check-out, no acks"),
}
THROUGHPUT: dict[str, Impl] = {
    "raw_pipelined": (
        tp_raw_pipelined,
        "sync",
        1,
        f"the ceiling: blocking parent, batches of {CALLERS} frames",
    ),
    "trio_pipe": (tp_trio_pipe, "trio", 1, "Trio raw pipe, multiplexed (reader routes by id)"),
    "open_worker": (tp_open_worker, "trio", 1, "one open_worker, 64 calls multiplexed"),
    "pool": (tp_pool, "trio", SPAWN_WORKERS, f'open_pool(workers={SPAWN_WORKERS}, launcher="zygote")'),
    "trio_parallel": (
        _tp_trio_parallel(SPAWN_WORKERS),
        "trio",
        SPAWN_WORKERS,
        f"trio_parallel.run_sync (spawn), limiter {SPAWN_WORKERS}",
    ),
    "process_pool_executor": (
        tp_ppe,
        "asyncio",
        SPAWN_WORKERS,
        f"ProcessPoolExecutor({SPAWN_WORKERS}, spawn) via run_in_executor",
    ),
    "anyio_to_process": (
        _tp_anyio(SPAWN_WORKERS),
        "trio",
        SPAWN_WORKERS,
        f"anyio.to_process.run_sync, trio backend, limiter {SPAWN_WORKERS}",
    ),
    "dspex_way": (
        tp_dspex_way,
        "trio",
        SPAWN_WORKERS,
        f"DSPex way: {SPAWN_WORKERS} cold workers, JSON lines, check-out (one call per worker), no acks",
    ),
}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One round of one scenario ("round_trip" pinned to ``spec["cpus"]``, or "throughput")."""
    os.sched_setaffinity(0, set(spec["cpus"]))  # before any thread or worker exists: all inherit it
    asyncio_log = _common.CountUnknownChild()
    logging.getLogger("asyncio").addFilter(asyncio_log)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    round_trip = spec["scenario"] == "round_trip"
    table = ROUND_TRIP if round_trip else THROUGHPUT
    for name in spec["implementations"]:
        fn, how, workers, desc = table[name]
        base = {"implementation": name, "workers": workers, "description": desc}
        try:
            got = run_one(fn, how, spec["warmup"], spec["n"], time_limit=spec["time_limit"])
        except Exception as exc:  # reported, the other implementations still run
            errors.append(f"{spec['scenario']}/{name}: {type(exc).__name__}: {exc}")
            continue
        if round_trip:
            lat = summarize_latencies(got)
            rows.append(
                {**base, "scenario": "1_round_trip", "metric": "p50", "value": lat["median"], "unit": "us"}
            )
            rows.append(
                {**base, "scenario": "1_round_trip", "metric": "p99", "value": lat["p99"], "unit": "us"}
            )
        else:
            rows.append(
                {**base, "scenario": "2_throughput", "metric": "calls_per_s", "value": got, "unit": "calls/s"}
            )
    return {"rows": rows, "errors": errors, "facts": {"asyncio_unknown_child_warnings": asyncio_log.count}}
