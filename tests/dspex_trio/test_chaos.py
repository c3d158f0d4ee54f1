"""Chaos: a short load run with workers SIGKILLed every 200 ms, orphans after the parent is SIGKILLed at
random points, and open/close cycles that must leave fd, thread and process counts flat.

The long versions run with ``--run-slow`` (and ``python -m benchmarks.chaos_load --long``); see
docs/operations.md ("Measured").
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
import trio

import dspex_trio
from benchmarks.chaos_load import load_violations, run_load, run_storm
from tests.dspex_trio.test_faults import PROJECT_ROOT, TAG_VAR, tagged_processes
from tests.helpers import child_processes, kill_quietly, open_fds, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and signals")


# -- load -------------------------------------------------------------------------------------------------


async def test_chaos_short_load_with_a_sigkill_every_200_ms() -> None:
    with trio.fail_after(60):
        # 8,000 calls (~3-4 s here: ~15 kills), bounded at 10 s on a slower machine
        report = await run_load(8000, 10.0, workers=2, kill_interval=0.2, launcher="auto")
    assert not load_violations(report), report
    assert report["calls"] == report["ok"] + report["failed"] and report["calls"] >= 2000, report
    assert report["hangs"] == report["misdelivered"] == report["untyped"] == 0
    assert report["idempotent_failed"] == 0  # every idempotent call that failed had its retry elsewhere (a
    # retry killed too is possible with a kill every 200 ms: ``idempotent_failed_twice``, reported)
    assert report["kills"] >= 5 and report["restarts"] >= report["kills"] - 1, report
    assert set(report["errors"]) <= {"WorkerCrashed"}, report["errors"]  # typed, and only the deaths
    assert report["circuit"] == "closed" and report["circuit_opened"] == 0


@pytest.mark.parametrize("how", ["fail_at_start", "killed_when_ready"])
async def test_workers_dying_as_soon_as_they_start_open_the_circuit(how: str) -> None:
    with trio.fail_after(30):
        report = await run_storm(how, launcher="subprocess")
    assert report["circuit_open"], report
    assert report["failures_counted"] == 6, report  # restart_intensity 5 (the default) + 1
    assert report["seconds_to_open"] < 5, report
    assert "budget" in report["reason"]


@pytest.mark.slow
async def test_chaos_long_load() -> None:
    with trio.fail_after(900):
        report = await run_load(100_000, 600.0, workers=2, kill_interval=0.2)
    print(report)
    assert not load_violations(report), report
    assert report["calls"] == 100_000, report


# -- orphans: the parent SIGKILLed at random points ---------------------------------------------------------

CYCLING_PARENT = textwrap.dedent(
    """
    import sys, trio, dspex_trio

    async def main():
        launcher = sys.argv[1]
        while True:  # start, calls (with a grandchild), shutdown, again: killed at a random point
            async with dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool:
                print("open", flush=True)
                await pool.call("spawn_child")
                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(pool.call, "sleep", {"seconds": 0.01 * (i % 5)})
                    nursery.start_soon(pool.call, "echo", {"value": "x" * 100_000})

    trio.run(main)
    """
)


async def _kill_parent_at_a_random_point(launcher: str, delay: float) -> None:
    tag = uuid.uuid4().hex
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", CYCLING_PARENT, launcher],
        stdout=subprocess.DEVNULL,
        cwd=PROJECT_ROOT,
        env={**os.environ, TAG_VAR: tag},
    )
    try:
        await trio.sleep(delay)
        process.kill()
        await process.wait()
        await wait_until(
            lambda: not tagged_processes(tag),
            1.0,
            lambda: f"killed after {delay:.2f} s: still alive after 1 s: {sorted(tagged_processes(tag))}",
        )
    finally:
        kill_quietly(process.pid)
        for pid in tagged_processes(tag):
            kill_quietly(pid, signal.SIGCONT)
            kill_quietly(pid)
        with trio.CancelScope(shield=True):
            await process.wait()


@pytest.mark.parametrize("launcher", ["subprocess", "zygote"])
async def test_parent_sigkilled_at_random_points_leaves_no_process(launcher: str) -> None:
    rng = random.Random(f"orphans-{launcher}")  # reproducible delays; the failure message names the delay
    with trio.fail_after(60):
        for _ in range(3):
            await _kill_parent_at_a_random_point(launcher, rng.uniform(0.05, 2.5))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["subprocess", "zygote"])
async def test_parent_sigkilled_at_random_points_leaves_no_process_long(launcher: str) -> None:
    rng = random.Random()
    with trio.fail_after(600):
        for _ in range(30):
            await _kill_parent_at_a_random_point(launcher, rng.uniform(0.0, 4.0))


# -- leaks: open/close cycles --------------------------------------------------------------------------------


async def _cycles(launcher: str, count: int) -> None:
    async def cycle() -> None:
        async with dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool:
            assert await pool.call("echo", {"value": 1}) == 1
        assert not child_processes(), child_processes()

    await cycle()  # warm-up: lazy imports, trio's thread cache
    fds = open_fds()
    threads = threading.active_count()
    start = time.monotonic()
    for _ in range(count):
        await cycle()
    elapsed = time.monotonic() - start
    await wait_until(lambda: threading.active_count() <= threads, 15, lambda: f"{threading.active_count()}")
    after = open_fds()
    assert len(after) <= len(fds), {fd: target for fd, target in after.items() if fds.get(fd) != target}
    assert not child_processes()
    print(f"{count} cycles ({launcher}) in {elapsed:.1f} s")


async def test_open_close_cycles_leave_fds_threads_and_processes_flat() -> None:
    with trio.fail_after(60):
        await _cycles("subprocess", 25)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["subprocess", "zygote"])
async def test_two_hundred_open_close_cycles_leave_everything_flat(launcher: str) -> None:
    with trio.fail_after(900):
        await _cycles(launcher, 200)
