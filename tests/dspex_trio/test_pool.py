"""The pool with real worker processes: routing, admission, sessions, failures, shutdown, leaks.

Ports the scenarios of the DSPex V2 pool suite (concurrency, session isolation, error isolation,
graceful shutdown) and adds the fault scenarios its design could not survive. Real processes run in
real time: conditions are awaited with a bound (``wait_until``), never slept on; every test has an
overall ``fail_after``. Tests use ``open_pool``'s default launcher, whichever it is.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio import (
    CallTimeout,
    CircuitState,
    DspexError,
    Overloaded,
    PoolUnavailable,
    ProgramNotFound,
    UnknownMethod,
    WorkerClosed,
    WorkerCrashed,
    WorkerState,
)
from tests.helpers import (
    child_processes,
    kill_quietly,
    open_fds,
    pid_alive,
    process_table,
    read_until,
    wait_until,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and signals")

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- helpers -------------------------------------------------------------------------------------------


def worker_pids(pool: dspex_trio.Pool) -> set[int]:
    return {w.pid for w in pool.statistics().workers}


def ready_pids(pool: dspex_trio.Pool) -> set[int]:
    return {w.pid for w in pool.statistics().workers if w.state in (WorkerState.READY, WorkerState.BUSY)}


def descendants_and_groups(root: int, groups: set[int]) -> set[int]:
    """Every live process below ``root`` (children, grandchildren, ...) or in one of ``groups``."""
    table = process_table()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (_s, ppid, _g) in table.items() if ppid in frontier} - found
        found |= frontier
    found |= {pid for pid, (_s, _p, pgid) in table.items() if pgid in groups}
    found.discard(root)
    return {pid for pid in found if pid_alive(pid)}


async def settle_quietly(fn: Callable[[], Any]) -> tuple[str, Any]:
    """Await ``fn()`` and return ("ok", value) or ("error", exception)."""
    try:
        return "ok", await fn()
    except DspexError as exc:
        return "error", exc


# -- start-up and routing ------------------------------------------------------------------------------


async def test_pool_starts_and_reports_its_workers() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=3, diagnostics=True) as pool:
            stats = pool.statistics()
            assert stats.size == 3 == pool.size
            assert stats.ready == 3
            assert len(stats.workers) == 3
            assert len({w.worker_id for w in stats.workers}) == 3
            assert all(w.worker_id for w in stats.workers)
            assert len({w.pid for w in stats.workers}) == 3
            for w in stats.workers:
                assert w.state == WorkerState.READY == "ready"
                assert w.pid != os.getpid() and pid_alive(w.pid)
                assert w.in_flight == 0 and w.calls_served == 0
            assert stats.circuit == CircuitState.CLOSED and stats.circuit_reason == ""
            assert stats.restarts == 0 and stats.in_flight == 0 and stats.queued == 0
            assert stats.launcher  # whichever the default is, it is named
            # the statistics name the real processes: each worker's own ping answers with its pid
            pids = worker_pids(pool)
            assert {(await worker.call("ping"))["pid"] for worker in pool.workers()} == pids
            assert (await pool.call("ping"))["pid"] in pids
        for pid in pids:
            assert not pid_alive(pid)


async def test_k_calls_on_k_workers_run_in_parallel() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=2, diagnostics=True, capacity=1) as pool:
            await pool.call("echo", {"value": 0})  # warm
            results: list[float] = []

            async def sleep_call() -> None:
                results.append(await pool.call("sleep", {"seconds": 0.5}))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sleep_call)
                nursery.start_soon(sleep_call)

                # the evidence is the workers' own: both sleep at the same time (not a duration,
                # which a loaded machine stretches); each has capacity 1, so one call each
                async def both_sleeping() -> bool:
                    infos = [await w.call("stats") for w in pool.workers()]
                    return all(len(info["executing"]) == 1 for info in infos)

                await wait_until(both_sleeping, 30, "the two sleeps never ran at the same time")
            assert results == [0.5, 0.5]


async def test_least_loaded_routing_spreads_concurrent_calls() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            pids = worker_pids(pool)
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(pool.call, "sleep", {"seconds": 0.4})
                await wait_until(lambda: pool.statistics().in_flight == 4, 2)
                assert sorted(w.in_flight for w in pool.statistics().workers) == [2, 2]
            assert sorted(w.calls_served for w in pool.statistics().workers) == [2, 2]
            # and the workers themselves agree: each ran two calls (their own counters, by pid)
            for worker in pool.workers():
                info = await worker.call("stats")
                assert info["pid"] in pids
                assert info["completed"] == 2, info


async def test_good_and_unknown_methods_concurrently() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            pids = worker_pids(pool)
            outcomes: dict[int, tuple[str, Any]] = {}

            async def one(i: int) -> None:
                if i % 2:
                    outcomes[i] = await settle_quietly(lambda: pool.call(f"no_such_method_{i}", {"i": i}))
                else:
                    seconds = 0.05 + i / 1000
                    outcomes[i] = await settle_quietly(lambda: pool.call("sleep", {"seconds": seconds}))

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
            for i, (kind, value) in outcomes.items():
                if i % 2:
                    assert kind == "error" and type(value) is UnknownMethod, (i, value)
                    assert f"no_such_method_{i}" in str(value)
                else:
                    assert (kind, value) == ("ok", 0.05 + i / 1000)
            # errors did not hurt the workers: the same ones keep serving
            assert [await pool.call("echo", {"value": i}) for i in range(10)] == list(range(10))
            stats = pool.statistics()
            assert worker_pids(pool) == pids
            assert stats.restarts == 0 and stats.ready == 2
            assert stats.failed == 20 and stats.completed == 30


async def test_diagnostic_methods_are_unknown_without_diagnostics() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=1) as pool:
            with pytest.raises(UnknownMethod):
                await pool.call("echo", {"value": 1})
            assert (await pool.call("ping"))["pid"] in worker_pids(pool)


# -- sessions ------------------------------------------------------------------------------------------


async def test_session_isolation_and_program_caching() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            spec = {"signature": "question -> answer", "module": "predict"}
            program = pool.sessions.add_program("A", spec)
            with pytest.raises(ProgramNotFound, match="session 'B'"):
                await pool.call("program_info", {"program": program.id}, session="B")
            with pytest.raises(ProgramNotFound):
                await pool.call("program_info", {"program": program.id})  # nor the default session

            async def ask() -> dict[str, Any]:
                result: dict[str, Any] = await pool.call("program_info", {"program": program.id}, session="A")
                return result

            async def beside_a_busy_worker() -> dict[str, Any]:
                """``program_info`` while a ``sleep`` keeps one worker busy: least-loaded routing puts it
                on another worker. (Two calls merely started together may both land on one worker: a lone
                call can be over within its caller's step, before the second is placed.)"""
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(functools.partial(pool.call, "sleep", {"seconds": 30}))
                    await wait_until(lambda: pool.statistics().in_flight == 1, 30, "the sleep never started")
                    result = await ask()
                    nursery.cancel_scope.cancel()  # the sleep's work is done
                return result

            async def each_worker() -> list[dict[str, Any]]:
                """Answers of a lone call and of a call beside a busy worker, until every worker answered."""
                infos: list[dict[str, Any]] = []
                for _ in range(20):
                    infos += [await ask(), await beside_a_busy_worker()]
                    if {i["pid"] for i in infos} == worker_pids(pool):
                        return infos
                raise AssertionError(f"the calls never reached every worker: {infos}")

            first = await each_worker()
            for info in first:
                assert info["id"] == program.id and info["spec"] == spec
            # the spec came with the first call to each worker (a second call to the same worker, if
            # the first was over before it was placed, found it cached)
            assert {i["pid"] for i in first if i["from_call"]} == worker_pids(pool), first
            second = await each_worker()
            assert [i["from_call"] for i in second] == [False] * len(second)  # cached by each worker
            for _ in range(5):  # sequential calls keep hitting a cache
                info = await pool.call("program_info", {"program": program.id}, session="A")
                assert info["from_call"] is False and info["spec"] == spec

            # a worker that lost its cache (but not its life) gets the spec again on a cache miss
            for worker in pool.workers():
                assert (await worker.call("reset"))["programs_dropped"] == 1
            info = await pool.call("program_info", {"program": program.id}, session="A")
            assert info["from_call"] is True and info["spec"] == spec

            # an update is a new version: the next call carries the new spec
            pool.sessions.update_program("A", program.id, instructions="be brief")
            info = await pool.call("program_info", {"program": program.id}, session="A")
            assert info["from_call"] is True and info["spec"] == {**spec, "instructions": "be brief"}

            # the same id in another session is another program; workers never mix them up
            pool.sessions.add_program("A", {"who": "A"}, program_id="shared")
            pool.sessions.add_program("B", {"who": "B"}, program_id="shared")
            for _ in range(3):
                a = await pool.call("program_info", {"program": "shared"}, session="A")
                b = await pool.call("program_info", {"program": "shared"}, session="B")
                assert a["spec"] == {"who": "A"} and b["spec"] == {"who": "B"}


async def test_a_program_survives_the_death_of_the_worker_that_cached_it() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=1, diagnostics=True) as pool:
            program = pool.sessions.add_program("s", {"signature": "a -> b"})
            info = await pool.call("program_info", {"program": program.id}, session="s")
            assert info["from_call"] is True
            again = await pool.call("program_info", {"program": program.id}, session="s")
            assert again["from_call"] is False
            old = info["pid"]
            os.kill(old, signal.SIGKILL)
            await wait_until(lambda: ready_pids(pool) - {old}, 10, lambda: repr(pool.statistics()))
            info = await pool.call("program_info", {"program": program.id}, session="s")
            assert info["pid"] != old
            assert info["from_call"] is True and info["spec"] == {"signature": "a -> b"}
            assert pool.statistics().restarts == 1


async def test_sessions_expire_on_the_pools_clock() -> None:
    now = [0.0]
    with trio.fail_after(20):
        async with dspex_trio.open_pool(
            workers=1, diagnostics=True, clock=lambda: now[0], session_ttl=60
        ) as pool:
            program = pool.sessions.add_program("s", {"n": 1})
            assert (await pool.call("program_info", {"program": program.id}, session="s"))["id"] == program.id
            assert pool.statistics().sessions == 1
            now[0] = 61.0
            # the maintenance task sweeps about once a second
            await wait_until(lambda: pool.statistics().sessions == 0, 3)
            with pytest.raises(ProgramNotFound):
                await pool.call("program_info", {"program": program.id}, session="s")


# -- admission and deadlines ---------------------------------------------------------------------------


async def test_overload_and_timeouts_are_typed() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=1, diagnostics=True, capacity=1, max_queue=2) as pool:
            async with trio.open_nursery() as nursery:
                # 60 s sleeps (cancelled below): none may end while the test looks at the queue
                nursery.start_soon(pool.call, "sleep", {"seconds": 60})
                await wait_until(lambda: pool.statistics().in_flight == 1, 30)
                nursery.start_soon(pool.call, "sleep", {"seconds": 60})
                nursery.start_soon(pool.call, "sleep", {"seconds": 60})
                await wait_until(lambda: pool.statistics().queued == 2, 30)

                start = time.monotonic()
                with pytest.raises(Overloaded):
                    await pool.call("echo", {"value": 1})
                assert time.monotonic() - start < 5  # at once, not when a place frees up (60 s)
                stats = pool.statistics()
                assert stats.overloaded == 1 and stats.queued == 2 and stats.in_flight == 1
                assert stats.checkout_success_rate < 1.0

                # asked to wait: it waits (for a place in the queue) and times out at its deadline
                start = time.monotonic()
                with pytest.raises(CallTimeout):
                    await pool.call("echo", {"value": 1}, wait=True, timeout=0.3)
                elapsed = time.monotonic() - start
                # at its deadline, not when a sleep ends (60 s); the upper bound allows a loaded machine
                assert 0.28 <= elapsed < 0.3 + 5, elapsed
                assert pool.statistics().overloaded == 1  # waiting is not a refusal

                nursery.cancel_scope.cancel()
            assert pool.statistics().queued == 0
            await wait_until(lambda: pool.statistics().in_flight == 0, 30)

            start = time.monotonic()
            with pytest.raises(CallTimeout):
                await pool.call("sleep", {"seconds": 60}, timeout=0.2)
            elapsed = time.monotonic() - start
            assert 0.19 <= elapsed < 0.2 + 5, elapsed  # at its deadline, not when the sleep ends
            # the worker dropped the timed-out call and serves the next one (capacity 1)
            assert await pool.call("echo", {"value": "after"}, timeout=30) == "after"
            await wait_until(lambda: pool.statistics().in_flight == 0, 30)
            assert pool.statistics().restarts == 0


async def test_a_queued_call_times_out_at_its_deadline() -> None:
    with trio.fail_after(20):
        async with (
            dspex_trio.open_pool(workers=1, diagnostics=True, capacity=1, max_queue=2) as pool,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(pool.call, "sleep", {"seconds": 60})  # cancelled at the end
            await wait_until(lambda: pool.statistics().in_flight == 1, 30)
            start = time.monotonic()
            with pytest.raises(CallTimeout):
                await pool.call("echo", {"value": 1}, timeout=0.3)
            # at its deadline, not when the sleep ends; the upper bound allows a loaded machine
            assert 0.28 <= time.monotonic() - start < 0.3 + 5
            assert pool.statistics().queued == 0
            nursery.cancel_scope.cancel()


async def test_no_reply_ever_reaches_another_caller() -> None:
    """3,000 calls, echoes of unique values and sleeps racing tight deadlines, on 2 workers: every
    answer is the caller's own, and the only errors are timeouts (V2 delivered late replies to the
    next caller)."""
    counts: Counter[str] = Counter()
    wrong: list[tuple[Any, Any]] = []
    unexpected: list[BaseException] = []
    ids = itertools.count()

    async def lane(pool: dspex_trio.Pool, rng: random.Random) -> None:
        for _ in range(60):
            i = next(ids)
            try:
                if i % 3 == 0:
                    seconds = round(rng.uniform(0.0, 0.02), 6) + i * 1e-9
                    expected: Any = seconds
                    got = await pool.call("sleep", {"seconds": seconds}, timeout=0.01)
                else:
                    expected = {"caller": i, "payload": "x" * (i % 50)}
                    got = await pool.call("echo", {"value": expected}, timeout=rng.choice([0.002, 0.05, 1]))
            except CallTimeout:
                counts["timeout"] += 1
                continue
            except BaseException as exc:
                unexpected.append(exc)
                continue
            counts["ok"] += 1
            if got != expected:
                wrong.append((expected, got))

    with trio.fail_after(60):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            pids = worker_pids(pool)
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(lane, pool, random.Random(n))
            assert not wrong, f"{len(wrong)} callers got another call's reply, e.g. {wrong[:3]}"
            assert not unexpected, unexpected[:5]
            assert counts["ok"] + counts["timeout"] == 3000
            assert counts["timeout"] > 0 and counts["ok"] > 1000, counts
            await wait_until(lambda: pool.statistics().in_flight == 0, 5)
            stats = pool.statistics()
            assert stats.calls == 3000
            assert stats.completed == counts["ok"] and stats.failed == counts["timeout"]
            assert worker_pids(pool) == pids and stats.restarts == 0  # timeouts never cost a worker
            # late replies arrived for abandoned calls and were dropped, not delivered
            assert sum(w.late_frames for w in stats.workers) > 0
            assert all(w.in_flight == 0 for w in stats.workers)
            for worker in pool.workers():  # nothing left running in the workers either

                async def idle(worker: dspex_trio.Worker = worker) -> bool:
                    info = await worker.call("stats")
                    return info["pending"] == [] and info["executing"] == []

                await wait_until(idle, 2)


# -- failures ------------------------------------------------------------------------------------------


async def test_sigkill_of_a_worker_under_load() -> None:
    results: dict[str, Counter[str]] = {"idem": Counter(), "non": Counter()}
    crashes: list[WorkerCrashed] = []
    other_errors: list[BaseException] = []

    async def call(idempotent: bool, seconds: float) -> None:
        kind = "idem" if idempotent else "non"
        try:
            value = await pool.call("sleep", {"seconds": seconds}, idempotent=idempotent)
        except WorkerCrashed as exc:
            results[kind]["crashed"] += 1
            crashes.append(exc)
            return
        except trio.Cancelled:
            raise  # the long batch calls still running at the end
        except BaseException as exc:
            other_errors.append(exc)
            return
        assert value == seconds
        results[kind]["ok"] += 1

    async def background(stop: trio.Event, i: int) -> None:
        while not stop.is_set():
            await call(i % 2 == 0, 0.02)

    with trio.fail_after(60):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            pids = worker_pids(pool)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                # first a batch of long calls: least-loaded routing alternates the workers, so each
                # runs two idempotent and two non-idempotent ones when the kill comes. 30 s each
                # (cancelled at the end): none may end before the kill, however loaded the machine.
                async with trio.open_nursery() as batch:
                    # one at a time: trio runs a batch of new tasks in no fixed order
                    for n, idem in enumerate((True, True, False, False, True, True, False, False), 1):
                        batch.start_soon(call, idem, 30.0)
                        await wait_until(lambda n=n: pool.statistics().in_flight == n, 30)
                    assert [w.in_flight for w in pool.statistics().workers] == [4, 4]
                    for i in range(8):  # then load on top
                        nursery.start_soon(background, stop, i)
                    await trio.sleep(0.2)
                    victim = pool.statistics().workers[0]
                    os.kill(victim.pid, signal.SIGKILL)
                    await wait_until(
                        lambda: ready_pids(pool) - pids, 30, lambda: f"no replacement: {pool.statistics()}"
                    )
                    # the victim's idempotent batch calls are retried (elsewhere), and the replacement
                    # serves some of the load; then the batch calls still sleeping are cancelled
                    await wait_until(lambda: pool.statistics().retried >= 2, 30, lambda: repr(results))
                    await wait_until(
                        lambda: any(w.calls_served for w in pool.statistics().workers if w.pid not in pids),
                        30,
                        "the replacement served nothing",
                    )
                    batch.cancel_scope.cancel()
                stop.set()
            stats = pool.statistics()
            assert not other_errors, other_errors
            assert results["idem"]["crashed"] == 0, results
            assert results["idem"]["ok"] > 0
            assert results["non"]["crashed"] >= 2, results  # the victim's non-idempotent batch calls
            for exc in crashes:
                assert exc.started is True
                assert exc.exit_status is not None and exc.exit_status.signal == signal.SIGKILL
                assert "SIGKILL" in str(exc)
            assert stats.retried >= 2  # the victim's idempotent batch calls, at least
            assert stats.restarts == 1
            assert stats.circuit == CircuitState.CLOSED
            assert victim.pid not in worker_pids(pool) and len(worker_pids(pool)) == 2
            assert not pid_alive(victim.pid)
            assert sum(w.calls_served for w in stats.workers if w.pid not in pids) > 0


async def test_unacked_call_is_redispatched_from_a_stopped_worker() -> None:
    stopped: int | None = None
    with trio.fail_after(20):
        async with dspex_trio.open_pool(
            workers=2, diagnostics=True, ack_timeout=0.5, heartbeat_interval=60
        ) as pool:
            try:
                async with trio.open_nursery() as nursery:
                    # occupy one worker so that least-loaded routing sends the next call to the other
                    nursery.start_soon(pool.call, "sleep", {"seconds": 3})
                    await wait_until(lambda: pool.statistics().in_flight == 1, 2)
                    busy = next(w for w in pool.statistics().workers if w.in_flight == 1)
                    stopped = next(w.pid for w in pool.statistics().workers if w.in_flight == 0)
                    os.kill(stopped, signal.SIGSTOP)
                    start = time.monotonic()
                    pong = await pool.call("ping")  # sent to the stopped worker; never acked
                    elapsed = time.monotonic() - start
                    nursery.cancel_scope.cancel()
                assert pong["pid"] != stopped
                assert pong["pid"] in worker_pids(pool)
                assert 0.45 <= elapsed < 3, elapsed
                stats = pool.statistics()
                assert stats.redispatched >= 1
                assert stats.failed == 1  # only the cancelled occupier
                await wait_until(lambda: not pid_alive(stopped), 5)  # killed as unresponsive
                await wait_until(lambda: len(ready_pids(pool)) == 2, 10)
                assert stopped not in worker_pids(pool) and busy.pid in worker_pids(pool)
                assert pool.statistics().restarts == 1
            finally:
                if stopped is not None:
                    kill_quietly(stopped, signal.SIGCONT)
                    kill_quietly(stopped, signal.SIGKILL)


async def test_restart_storm_opens_the_circuit_without_looping() -> None:
    with trio.fail_after(30):
        async with dspex_trio.open_pool(
            workers=2,
            diagnostics=True,
            fail_at_start=3,
            restart_intensity=3,
            restart_period=10,
            probe_backoff=0.5,
        ) as pool:
            stats = pool.statistics()
            assert stats.circuit == CircuitState.OPEN
            assert "budget" in stats.circuit_reason and "exit code 3" in stats.circuit_reason
            assert stats.ready == 0 and stats.workers == ()

            start = time.monotonic()
            with pytest.raises(PoolUnavailable) as info:
                await pool.call("echo", {"value": 1})
            assert time.monotonic() - start < 0.1
            assert "budget" in info.value.reason
            with pytest.raises(PoolUnavailable):
                await pool.call("echo", {"value": 1}, wait=True, timeout=5)
            assert time.monotonic() - start < 0.1

            launched: set[str] = set()
            failed_at: list[float] = []
            circuits: list[str] = []

            def hook(worker: dspex_trio.Worker, old: WorkerState, new: WorkerState, reason: str) -> None:
                launched.add(worker.worker_id)
                if new == WorkerState.FAILED:
                    failed_at.append(time.monotonic())

            pool._transition_hooks.append(hook)
            restarts_before = pool.statistics().restarts
            cpu_before = time.process_time()
            wall_before = time.monotonic()
            while time.monotonic() - wall_before < 2.0:
                circuits.append(pool.statistics().circuit)
                await trio.sleep(0.05)
            cpu = time.process_time() - cpu_before
            restarts = pool.statistics().restarts - restarts_before
            # probes back off (0.5 s, then 1 s, 2 s, ...): a couple of launches in 2 s, not a loop
            assert 1 <= len(launched) <= 3, launched
            assert len(failed_at) == len(launched)
            gaps = [b - a for a, b in itertools.pairwise(failed_at)]
            assert all(gap >= 0.9 for gap in gaps), f"probes not backing off: {gaps}"
            assert restarts <= 4, restarts
            assert cpu < 0.5, f"{cpu:.2f} s of CPU in 2 s with the circuit open"
            assert CircuitState.CLOSED not in circuits
            assert pool.statistics().circuit in (CircuitState.OPEN, CircuitState.HALF_OPEN)
            assert pool.statistics().unavailable >= 2


async def test_workers_killed_now_and_then_are_simply_replaced() -> None:
    failures: list[BaseException] = []
    ok = 0
    killed: list[int] = []
    done = [0] * 16  # calls completed by each lane

    async def lane(pool: dspex_trio.Pool, stop: trio.Event, i: int) -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                if i % 2:
                    assert await pool.call("sleep", {"seconds": 0.01}, idempotent=True) == 0.01
                else:
                    assert await pool.call("echo", {"value": i}, idempotent=True) == i
                ok += 1
                done[i] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    with trio.fail_after(40):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            stop = trio.Event()
            born = {pid: n for n, pid in enumerate(sorted(worker_pids(pool)))}
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(lane, pool, stop, i)
                for _ in range(10):  # one SIGKILL every 200 ms or more, to the oldest live worker
                    # A call is retried once, so no call may meet two kills ("now and then"): before the
                    # next kill every lane completes a call, so the calls in flight at the last kill
                    # (their retries included) are over, however slow a loaded machine makes them.
                    since = list(done)
                    await trio.sleep(0.2)
                    await wait_until(
                        lambda since=since: all(d > s for d, s in zip(done, since, strict=True)) or failures,
                        30,
                        lambda since=since: (
                            f"lanes without a call completed since the last kill: {done}, {since}"
                        ),
                    )
                    await wait_until(lambda: ready_pids(pool), 10, lambda: repr(pool.statistics()))
                    for pid in sorted(ready_pids(pool)):
                        born.setdefault(pid, len(born))
                    victim = min(ready_pids(pool), key=born.__getitem__)
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
                    assert pool.statistics().circuit == CircuitState.CLOSED
                await wait_until(lambda: len(ready_pids(pool)) == 2, 10)
                await trio.sleep(0.2)
                stop.set()
            assert not failures, failures[:3]
            assert ok > 100
            stats = pool.statistics()
            assert len(killed) == 10
            assert stats.circuit == CircuitState.CLOSED
            assert stats.restarts == len(killed)
            assert not set(killed) & worker_pids(pool)
            assert all(not pid_alive(pid) for pid in killed)


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, trio, dspex_trio

    async def main():
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            await pool.call("echo", {"value": 1})
            print(json.dumps(sorted(w.pid for w in pool.statistics().workers)), flush=True)
            await trio.sleep(3600)

    trio.run(main)
    """
)


async def test_no_worker_outlives_a_sigkilled_parent() -> None:
    with trio.fail_after(30):
        parent = await trio.lowlevel.open_process(
            [sys.executable, "-c", PARENT_SCRIPT],
            stdout=subprocess.PIPE,
            cwd=PROJECT_ROOT,
        )
        doomed: set[int] = set()
        try:
            assert parent.stdout is not None
            with trio.fail_after(20):
                line = await read_until(
                    parent.stdout,
                    lambda data: data.endswith(b"\n"),
                    "the parent exited before printing its workers",
                )
            pids = set(json.loads(line))
            assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
            # everything the parent started: its children (workers, a zygote if any), their children,
            # and anything in a worker's process group
            doomed = descendants_and_groups(parent.pid, pids)
            assert pids <= doomed
            parent.kill()
            assert await parent.wait() == -signal.SIGKILL
            took = await wait_until(
                lambda: not any(pid_alive(pid) for pid in doomed),
                1.0,
                lambda: f"still alive: {[p for p in doomed if pid_alive(p)]}",
            )
            assert took < 1.0
        finally:
            kill_quietly(parent.pid)
            await parent.wait()
            if parent.stdout is not None:
                await parent.stdout.aclose()
            for pid in doomed:
                kill_quietly(pid)


# -- shutdown ------------------------------------------------------------------------------------------


async def test_shutdown_lets_calls_finish_within_the_grace() -> None:
    results: list[Any] = []

    async def caller(pool: dspex_trio.Pool, i: int) -> None:
        results.append(await pool.call("sleep", {"seconds": 0.3 + i / 1000}))

    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            async with dspex_trio.open_pool(workers=2, diagnostics=True, drain_grace=2) as pool:
                pids = worker_pids(pool)
                for i in range(6):
                    outer.start_soon(caller, pool, i)
                await wait_until(lambda: pool.statistics().in_flight == 6, 2)
                start = time.monotonic()
            elapsed = time.monotonic() - start  # the exit waited for the drain
            with pytest.raises(WorkerClosed):  # admission stopped
                await pool.call("echo", {"value": 1})
        assert sorted(results) == [0.3 + i / 1000 for i in range(6)]
        assert 0.2 <= elapsed < 1.5, elapsed
        assert not any(pid_alive(pid) for pid in pids)


async def test_shutdown_grace_expiry_is_bounded_and_fails_the_calls() -> None:
    outcomes: list[tuple[str, Any]] = []

    async def caller(pool: dspex_trio.Pool) -> None:
        outcomes.append(await settle_quietly(lambda: pool.call("sleep", {"seconds": 10})))

    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            async with dspex_trio.open_pool(workers=2, diagnostics=True, drain_grace=0.3) as pool:
                pids = worker_pids(pool)
                for _ in range(4):
                    outer.start_soon(caller, pool)
                await wait_until(lambda: pool.statistics().in_flight == 4, 2)
                start = time.monotonic()
            elapsed = time.monotonic() - start
        assert 0.25 <= elapsed < 3, elapsed
        assert len(outcomes) == 4
        for kind, exc in outcomes:
            assert kind == "error", f"a 10 s sleep returned {exc!r} after a 0.3 s grace"
            assert type(exc) is WorkerClosed, repr(exc)
            assert "shut down" in str(exc)
        assert not any(pid_alive(pid) for pid in pids)


async def test_leaving_the_block_by_an_exception_tears_everything_down() -> None:
    pids: set[int] = set()
    with trio.fail_after(20), pytest.raises(KeyError, match="boom"):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            pids = worker_pids(pool)
            raise KeyError("boom")
    assert len(pids) == 2 and not any(pid_alive(pid) for pid in pids)
    assert not child_processes()


CYCLES = 50
CYCLES_MIN = 20
CYCLES_BUDGET_S = 15.0
"""Open/close cycles: 50, unless a slow launcher (a zygote importing dspy per pool) or a loaded machine
spends the budget first; never fewer than ``CYCLES_MIN``."""


async def test_open_close_cycles_leak_nothing() -> None:
    closes: list[float] = []

    async def cycle() -> None:
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            assert await pool.call("echo", {"value": "x"}) == "x"
            closing = time.monotonic()
        closes.append(time.monotonic() - closing)
        assert not child_processes(), child_processes()  # reaped at once: no zombie, no live child

    with trio.fail_after(90):
        await cycle()  # warm-up: lazy imports, trio's thread cache, ...
        fds_before = open_fds()
        threads_before = threading.active_count()
        start = time.monotonic()
        cycles = 0
        while cycles < CYCLES and (cycles < CYCLES_MIN or time.monotonic() - start < CYCLES_BUDGET_S):
            await cycle()
            cycles += 1
        elapsed = time.monotonic() - start
        await wait_until(
            lambda: threading.active_count() <= threads_before,
            5,
            lambda: f"{threading.active_count()} threads, {threads_before} before",
        )
        fds_after = open_fds()
        assert len(fds_after) <= len(fds_before), (
            f"{len(fds_after) - len(fds_before)} fds more after {cycles} cycles: "
            f"{ {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target} }"
        )
        # closing an idle pool is prompt: the shutdown frame suffices, no SIGTERM/SIGKILL escalation
        closes.sort()
        assert closes[len(closes) // 2] < 0.25 and closes[-1] < 2.0, closes
        assert cycles == CYCLES or elapsed >= CYCLES_BUDGET_S, (cycles, elapsed)


# -- recycling and statistics --------------------------------------------------------------------------


async def test_workers_are_recycled_after_max_calls() -> None:
    lanes = 6
    with trio.fail_after(40):
        async with dspex_trio.open_pool(workers=2, diagnostics=True, max_calls_per_worker=50) as pool:
            first = worker_pids(pool)
            final: dict[int, tuple[WorkerState, int]] = {}  # how each worker ended, and calls it served

            def on_transition(
                worker: dspex_trio.Worker, old: WorkerState, new: WorkerState, why: str
            ) -> None:
                if new in (WorkerState.STOPPED, WorkerState.FAILED):
                    final[worker.pid] = (new, worker.statistics().calls_served)

            pool._transition_hooks.append(on_transition)
            values: dict[int, Any] = {}

            async def lane(k: int) -> None:
                for i in range(k, 300, lanes):
                    values[i] = await pool.call("echo", {"value": i})

            async with trio.open_nursery() as nursery:
                for k in range(lanes):
                    nursery.start_soon(lane, k)
            assert values == {i: i for i in range(300)}
            stats = pool.statistics()
            assert stats.failed == 0 and stats.completed == 300
            assert stats.recycled >= 4, stats
            assert stats.restarts == 0 and stats.circuit == CircuitState.CLOSED
            await wait_until(lambda: len(ready_pids(pool)) == 2 and len(final) == stats.recycled, 10)
            live = {w.pid: w.calls_served for w in pool.statistics().workers}
            assert not first & set(live)  # the first two were replaced
            assert len(final) >= 4 and not set(final) & set(live)
            for pid, (state, calls) in final.items():
                assert state == WorkerState.STOPPED  # a clean drain and exit, not a kill
                # retired at the limit: never before it, and past it only by the calls already in flight
                assert 50 <= calls < 50 + lanes, final
                assert not pid_alive(pid)
            assert sum(calls for _state, calls in final.values()) + sum(live.values()) == 300


async def test_statistics() -> None:
    with trio.fail_after(20):
        async with dspex_trio.open_pool(workers=2, diagnostics=True) as pool:
            assert pool.statistics().latency == {}
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(pool.call, "echo", {"value": i})
                nursery.start_soon(pool.call, "sleep", {"seconds": 0.1})
            stats = pool.statistics()
            echo = stats.latency["echo"]
            assert echo.count == 40
            assert 0 < echo.p50 <= echo.p90 <= echo.p99 <= echo.max < 5
            sleep = stats.latency["sleep"]
            assert sleep.count == 1 and 0.1 <= sleep.p50 == sleep.max < 1
            assert stats.checkout_success_rate == 1.0
            assert stats.in_flight == 0 and stats.queued == 0
            assert stats.calls == 41 and stats.completed == 41 and stats.failed == 0
            assert stats.overloaded == 0 and stats.unavailable == 0
            assert sum(w.calls_served for w in stats.workers) == 41
            assert all(w.in_flight == 0 and w.state == WorkerState.READY for w in stats.workers)
            with pytest.raises(UnknownMethod):
                await pool.call("nope")
            stats2 = pool.statistics()
            assert stats2.failed == 1 and "nope" not in stats2.latency
            # a frozen snapshot: the first one did not change
            assert stats.failed == 0
            with pytest.raises(AttributeError):
                stats.size = 5  # type: ignore[misc]


async def test_unknown_options_are_refused() -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        async with dspex_trio.open_pool(workers=1, no_such_option=1):
            pass  # pragma: no cover
    with pytest.raises(ValueError):
        async with dspex_trio.open_pool(workers=0):
            pass  # pragma: no cover
    assert not child_processes()
