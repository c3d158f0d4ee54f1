"""The 17 fault scenarios of ``notes/peers.md``, each as a named test against the real POOL.

Where ``test_worker.py`` covers a scenario against a single worker handle, the test here drives it
through ``open_pool`` and asserts what the pool adds: which calls fail and how, which are re-dispatched,
that the slot is refilled (``restarts``), that the health events tell the same story, and that nothing
is left running. Most tests fork their workers from the test run's warm template (``FAST``: a pool is
ready in milliseconds instead of ~0.2 s for subprocesses or ~1.2 s for a zygote template of its own,
which imports dspy); the ones where the launcher changes what happens to processes (parent death,
grandchildren, leaks) run on both cold launchers.

Real processes run in real time: every wait is bounded (``wait_until``, ``fail_after``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio import (
    CircuitState,
    DspexError,
    InvalidParams,
    PoolUnavailable,
    ProtocolError,
    WorkerClosed,
    WorkerCrashed,
    WorkerState,
    WorkerUnresponsive,
)
from dspex_trio._launcher import SubprocessLauncher
from dspex_trio.testing._plugin import _template_pids
from tests.helpers import child_processes, kill_quietly, open_fds, pid_alive, process_table, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and signals")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FAST = "auto"
"""The launcher of most tests here (see the module docstring): in this suite, fresh workers forked from
the test run's warm template (tests/conftest.py), ready in milliseconds; cold with ``--dspex-cold``."""
BOTH_LAUNCHERS = pytest.mark.parametrize("launcher", ["subprocess", "zygote"])
TAG_VAR = "DSPEX_TEST_TAG"
"""Set to a fresh uuid in a parent script's environment: every process it starts (workers, the zygote,
grandchildren) inherits it, so a ``/proc`` scan finds them all whoever their parent is now."""


# -- helpers (also used by test_chaos.py and test_model.py) ------------------------------------------------


def tagged_processes(tag: str) -> set[int]:
    """Live (non-zombie) processes whose environment holds ``DSPEX_TEST_TAG=<tag>``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(int(name)):
            found.add(int(name))
    return found


def proc_children(parent: int) -> set[int]:
    """Live (non-zombie) direct children of ``parent``."""
    return {pid for pid, stat in process_table().items() if stat.ppid == parent and stat.state != "Z"}


def live_worker_processes(pool: dspex_trio.Pool) -> set[int]:
    """Every live process that is a worker: children of the zygote templates (the pool's own, the
    test run's warm ones: tests/conftest.py) and our own children other than those."""
    zygote = getattr(pool._launcher, "zygote", None)
    templates = ({zygote.pid} if zygote is not None else set()) | _template_pids()  # the run's warm ones too
    found = proc_children(os.getpid()) - templates
    for template in templates:
        found |= proc_children(template)
    return found


def ready_pids(pool: dspex_trio.Pool) -> set[int]:
    return {w.pid for w in pool.statistics().workers if w.state in (WorkerState.READY, WorkerState.BUSY)}


async def settle(fn: Callable[[], Awaitable[Any]]) -> tuple[str, Any]:
    """("ok", value) or ("error", the DspexError)."""
    try:
        return "ok", await fn()
    except DspexError as exc:
        return "error", exc


class Transitions:
    """Every worker state transition of a pool (a transition hook: synchronous, never lossy)."""

    def __init__(self, pool: dspex_trio.Pool) -> None:
        self.seen: list[tuple[str, int, WorkerState, WorkerState, str]] = []
        pool._transition_hooks.append(self)

    def __call__(self, worker: dspex_trio.Worker, old: WorkerState, new: WorkerState, why: str) -> None:
        self.seen.append((worker.worker_id, worker.pid, old, new, why))

    def to(self, state: WorkerState) -> list[tuple[str, int, WorkerState, WorkerState, str]]:
        return [t for t in self.seen if t[3] == state]


@asynccontextmanager
async def fast_pool(**options: Any) -> Any:
    options.setdefault("workers", 2)
    options.setdefault("launcher", FAST)
    async with dspex_trio.open_pool(diagnostics=True, **options) as pool:
        yield pool


@contextmanager
def no_core_dumps() -> Iterator[None]:
    """Children started meanwhile inherit a zero core-file limit (a SIGSEGV leaves no core file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


async def worker_idle(worker: dspex_trio.Worker) -> bool:
    """True when nothing runs or waits in the worker process itself."""
    info = await worker.call("stats")
    return info["executing"] == [] and info["pending"] == []


async def assert_consistent(pool: dspex_trio.Pool, *, workers: int = 2) -> None:
    """The pool is back to normal: full, idle, nothing queued, and it serves a call."""
    await wait_until(lambda: len(ready_pids(pool)) == workers, 30, lambda: repr(pool.statistics()))
    await wait_until(lambda: pool.statistics().in_flight == 0, 30, lambda: repr(pool.statistics()))
    stats = pool.statistics()
    assert stats.queued == 0 and stats.in_flight == 0
    assert all(w.in_flight == 0 for w in stats.workers), stats.workers
    for worker in pool.workers():
        await wait_until(functools.partial(worker_idle, worker), 30)
    token = uuid.uuid4().hex
    assert await pool.call("echo", {"value": token}) == token


# -- parent scripts (scenarios 5, 13, 14) ----------------------------------------------------------------

PARENT_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, trio, dspex_trio

    LAUNCHER = sys.argv[1]
    MODE = sys.argv[2]  # "sleep" (calls in flight), "write" (workers busy writing to us), "signals"

    async def main():
        outcomes = []
        async with dspex_trio.open_pool(
            workers=2, diagnostics=True, launcher=LAUNCHER, drain_grace=0.5, shutdown_grace=0.5
        ) as pool:
            grandchildren = [await w.call("spawn_child") for w in pool.workers()]

            async def one(method, params):
                try:
                    await pool.call(method, params)
                    outcomes.append("ok")
                except dspex_trio.DspexError as exc:
                    outcomes.append(type(exc).__name__)
                except trio.Cancelled:
                    outcomes.append("cancelled")
                    raise

            async def writer():
                big = "x" * 200_000
                while True:
                    await one("echo", {"value": big})

            report = {"pid": os.getpid(), "workers": sorted(w.pid for w in pool.workers()),
                      "grandchildren": grandchildren}
            try:
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async with trio.open_nursery() as nursery:
                        for _ in range(6):
                            nursery.start_soon(one, "sleep", {"seconds": 30})
                        if MODE == "write":
                            for _ in range(4):
                                nursery.start_soon(writer)
                            nursery.start_soon(one, "spew_stderr", {"bytes": 50_000_000})
                        while pool.statistics().in_flight < 6:
                            await trio.sleep(0.01)
                        print(json.dumps(report), flush=True)
                        async for signum in signals:
                            nursery.cancel_scope.cancel()
                            break
            finally:
                report["outcomes"] = sorted(set(outcomes))
                report["in_flight"] = pool.statistics().in_flight
        print(json.dumps(report), flush=True)

    try:
        trio.run(main)
    except* KeyboardInterrupt:
        print(json.dumps({"interrupted": True}), flush=True)
        sys.exit(130)
    """
)


async def read_json_line(stream: trio.abc.ReceiveStream, buffer: bytearray, timeout: float) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while b"\n" not in buffer:
            chunk = await stream.receive_some(65536)
            assert chunk, f"the parent script exited early; it wrote {bytes(buffer)!r}"
            buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    result: dict[str, Any] = json.loads(line)
    return result


@asynccontextmanager
async def parent_script(launcher: str, mode: str, *, new_session: bool = False) -> Any:
    """Run ``PARENT_SCRIPT``; yields (process, tag, its first report, the stdout buffer)."""
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG_VAR: tag}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", PARENT_SCRIPT, launcher, mode],
        stdout=subprocess.PIPE,
        cwd=PROJECT_ROOT,
        env=env,
        start_new_session=new_session,
    )
    buffer = bytearray()
    try:
        assert process.stdout is not None
        report = await read_json_line(process.stdout, buffer, 30)
        yield process, tag, report, buffer
    finally:
        kill_quietly(process.pid)
        for pid in tagged_processes(tag):
            kill_quietly(pid, signal.SIGCONT)
            kill_quietly(pid)
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def assert_all_gone(tag: str, within: float) -> float:
    return await wait_until(
        lambda: not tagged_processes(tag), within, lambda: f"still alive: {sorted(tagged_processes(tag))}"
    )


# -- 1. a worker dies mid-call ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "named"),
    [("exit", "exit code 7"), ("sigkill", "SIGKILL"), ("segfault", "SIGSEGV"), ("exception", None)],
)
async def test_fault_01_worker_dies_mid_call(how: str, named: str | None) -> None:
    with no_core_dumps(), trio.fail_after(30):
        async with fast_pool() as pool:
            transitions = Transitions(pool)
            before = ready_pids(pool)
            outcomes: list[tuple[str, Any]] = []

            async def sleeper() -> None:  # 30 s, cancelled once the test has seen what it checks: the
                # kill comes before the victim's calls end however loaded the machine (0.8 s did not)
                outcomes.append(await settle(lambda: pool.call("sleep", {"seconds": 30})))

            async with trio.open_nursery() as nursery:
                for _ in range(4):  # least-loaded routing: two on each worker
                    nursery.start_soon(sleeper)
                await wait_until(lambda: [w.in_flight for w in pool.statistics().workers] == [2, 2], 30)
                start = time.monotonic()
                if how == "sigkill":
                    victim = pool.statistics().workers[0].pid
                    os.kill(victim, signal.SIGKILL)
                    killer: tuple[str, Any] = ("none", None)
                else:
                    params = {
                        "exit": ("crash", {"exit_code": 7}),
                        "segfault": ("crash", {"signal": "SIGSEGV"}),
                        "exception": ("raise", {"message": "boom"}),
                    }[how]
                    killer = await settle(lambda: pool.call(*params))
                if how != "exception":
                    await wait_until(lambda: len(outcomes) >= 2, 30, lambda: repr(outcomes))
                    detected = time.monotonic() - start
                    # long before the sleeps would have ended (milliseconds on a quiet machine; seen
                    # at 2 s pinned to one core beside two CPU hogs: the template's exit report)
                    assert detected < 5, detected
                # the other worker's calls were not touched: still running (then cancelled)
                assert len(outcomes) == (0 if how == "exception" else 2), outcomes
                assert pool.statistics().in_flight == 4 - len(outcomes), pool.statistics()
                nursery.cancel_scope.cancel()
            errors = [exc for kind, exc in outcomes if kind == "error"]
            if how == "exception":  # not a death: an error reply, the worker keeps serving
                kind, exc = killer
                assert kind == "error" and type(exc) is dspex_trio.WorkerError
                assert exc.error_type == "RuntimeError" and "boom" in str(exc)
                assert not errors and pool.statistics().restarts == 0 and ready_pids(pool) == before
                return
            assert len(errors) == 2, outcomes  # the two on the victim
            if how != "sigkill":
                errors.append(killer[1])
            for exc in errors:
                assert type(exc) is WorkerCrashed, repr(exc)
                assert exc.started and named is not None and named in str(exc)
                assert exc.exit_status is not None
            (_victim_id, victim_pid, *_rest) = transitions.to(WorkerState.FAILED)[0]
            assert not pid_alive(victim_pid) and victim_pid in before
            await assert_consistent(pool)
            stats = pool.statistics()
            assert stats.restarts == 1 and stats.circuit == CircuitState.CLOSED
            assert len(transitions.to(WorkerState.FAILED)) == 1
            assert named is not None and named in transitions.to(WorkerState.FAILED)[0][4]
            new = ready_pids(pool) - before
            assert len(new) == 1 and victim_pid not in ready_pids(pool)


# -- 2. a worker hangs with calls in flight ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigstop", "stuck_reader"])
async def test_fault_02_worker_hangs_with_calls_in_flight(how: str) -> None:
    interval, missed = 0.1, 3
    victim: int | None = None
    with trio.fail_after(30):
        async with fast_pool(heartbeat_interval=interval, heartbeat_missed=missed, ack_timeout=1.0) as pool:
            transitions = Transitions(pool)
            try:
                target = pool.workers()[0]
                victim = target.pid
                outcomes: list[tuple[str, Any]] = []

                async def on_victim(method: str, params: Any) -> None:
                    outcomes.append(await settle(lambda: target.call(method, params)))

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(on_victim, "sleep", {"seconds": 5})
                    await wait_until(lambda: target.statistics().in_flight == 3, 5)
                    await trio.sleep(0.05)  # acked
                    start = time.monotonic()
                    if how == "sigstop":
                        os.kill(victim, signal.SIGSTOP)
                    else:
                        nursery.start_soon(on_victim, "hang", None)
                    # meanwhile the pool keeps serving on the other worker
                    for i in range(20):
                        assert await pool.call("echo", {"value": i}) == i
                    await wait_until(lambda: len(outcomes) >= 3, 5)
                    detected = time.monotonic() - start
                assert detected <= interval * (missed + 1) + 0.5, detected
                assert len(outcomes) == 3 + (how == "stuck_reader")
                for kind, exc in outcomes:
                    assert kind == "error" and isinstance(exc, WorkerUnresponsive), exc
                    assert "heartbeats" in str(exc)
                await wait_until(lambda: not pid_alive(victim), 5)  # killed and reaped
                await assert_consistent(pool)
                assert victim not in ready_pids(pool)
                assert pool.statistics().restarts == 1
                assert [t[1] for t in transitions.to(WorkerState.FAILED)] == [victim]
            finally:
                if victim is not None:
                    kill_quietly(victim, signal.SIGCONT)
                    kill_quietly(victim)


# -- 3. cancellation at every checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", ["before_send", "awaiting_ack", "awaiting_result", "during_shutdown"])
async def test_fault_03_cancellation_at_every_checkpoint(checkpoint: str) -> None:
    stopped: int | None = None
    with trio.fail_after(30):
        if checkpoint == "during_shutdown":
            pids: set[int] = set()
            cancelled = 0
            with trio.CancelScope() as outer:
                async with trio.open_nursery() as nursery, fast_pool(drain_grace=10) as pool:
                    pids = ready_pids(pool)

                    async def long_call() -> None:
                        nonlocal cancelled
                        try:
                            await pool.call("sleep", {"seconds": 30})
                        except trio.Cancelled:
                            cancelled += 1
                            raise

                    for _ in range(4):
                        nursery.start_soon(long_call)
                    await wait_until(lambda: pool.statistics().in_flight == 4, 5)

                    async def cancel_soon() -> None:
                        await trio.sleep(0.2)  # the pool is draining by then
                        assert pool._closing
                        outer.cancel()

                    nursery.start_soon(cancel_soon)
                    start = time.monotonic()
                # leaving the pool block with calls in flight: the drain waits for them ...
            elapsed = time.monotonic() - start
            # ... until the cancel reached them: they end as Cancelled, the drain ends, nothing is left
            # (well under the 10 s drain grace, which it did not wait out; a loaded CI machine took 3.05 s)
            assert cancelled == 4 and 0.15 < elapsed < 8, (cancelled, elapsed)
            stats = pool.statistics()
            assert stats.in_flight == 0 and stats.queued == 0 and stats.workers == ()
            assert not any(pid_alive(pid) for pid in pids) and not child_processes()
            with pytest.raises(WorkerClosed):
                await pool.call("echo", {"value": 1})
            return

        options: dict[str, Any] = {"capacity": 1} if checkpoint == "before_send" else {}
        if checkpoint == "awaiting_ack":
            options.update(workers=1, heartbeat_interval=30, ack_timeout=10)
        async with fast_pool(**options) as pool:
            try:
                if checkpoint == "before_send":
                    async with trio.open_nursery() as nursery:  # both workers busy: the call queues
                        for _ in range(2):  # (30 s, cancelled below: neither may end meanwhile)
                            nursery.start_soon(pool.call, "sleep", {"seconds": 30})
                        await wait_until(lambda: pool.statistics().in_flight == 2, 30)
                        inner = trio.CancelScope()

                        async def queued() -> None:
                            with inner:
                                await pool.call("echo", {"value": 1}, wait=True)
                                raise AssertionError("a cancelled queued call returned")

                        nursery.start_soon(queued)
                        await wait_until(lambda: pool.statistics().queued == 1, 5)
                        inner.cancel()
                        await wait_until(lambda: pool.statistics().queued == 0, 30)
                        assert pool.statistics().in_flight == 2  # the queued one never went out
                        nursery.cancel_scope.cancel()
                elif checkpoint == "awaiting_ack":
                    stopped = pool.workers()[0].pid
                    os.kill(stopped, signal.SIGSTOP)  # it will not ack
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(pool.call, "sleep", {"seconds": 5})
                        await wait_until(lambda: pool.statistics().in_flight == 1, 5)
                        await trio.sleep(0.1)
                        nursery.cancel_scope.cancel()
                    os.kill(stopped, signal.SIGCONT)  # it now reads the call and its cancel
                else:  # awaiting_result
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(pool.call, "sleep", {"seconds": 30})
                        await wait_until(lambda: pool.statistics().in_flight == 1, 5)
                        await wait_until(lambda: any(w.in_flight != 0 for w in pool.statistics().workers), 5)

                        async def running() -> bool:
                            return any([(await w.call("stats"))["executing"] for w in pool.workers()])

                        await wait_until(running, 5)  # acked and running in the worker
                        nursery.cancel_scope.cancel()
                assert pool.statistics().in_flight == 0
                await assert_consistent(pool, workers=options.get("workers", 2))
                stats = pool.statistics()
                assert stats.restarts == 0 and stats.circuit == CircuitState.CLOSED
                if checkpoint == "awaiting_ack":
                    # the late ack/answer of the cancelled call was dropped, not delivered
                    assert pool.workers()[0].pid == stopped
            finally:
                if stopped is not None:
                    kill_quietly(stopped, signal.SIGCONT)


# -- 4. a worker ignoring SIGTERM --------------------------------------------------------------------------


async def test_fault_04_worker_ignoring_sigterm_is_sigkilled_within_the_grace() -> None:
    term_grace = 0.3
    with trio.fail_after(30):
        async with fast_pool(term_grace=term_grace, heartbeat_interval=60, drain_grace=0.2) as pool:
            transitions = Transitions(pool)
            stubborn, polite = pool.workers()
            assert await stubborn.call("ignore_signal", {"signal": "SIGTERM"}) == "SIGTERM"
            with trio.move_on_after(0.2):  # its reader is now stuck: it reads no shutdown frame either
                await stubborn.call("hang")
            start = time.monotonic()
        elapsed = time.monotonic() - start
    # the ladder: shutdown frame (unread) -> 0.5 s slack -> SIGTERM (ignored) -> term_grace -> SIGKILL
    assert term_grace < elapsed < term_grace + 2.5, elapsed
    assert stubborn.exit_status is not None and stubborn.exit_status.signal == signal.SIGKILL
    assert polite.exit_status is not None and polite.exit_status.code == 0
    ends = {t[0]: t[3] for t in transitions.seen if t[3] in (WorkerState.STOPPED, WorkerState.FAILED)}
    assert ends == {stubborn.worker_id: WorkerState.FAILED, polite.worker_id: WorkerState.STOPPED}
    assert not pid_alive(stubborn.pid) and not child_processes()


# -- 5. broken pipes, both ways ---------------------------------------------------------------------------


async def test_fault_05_broken_pipe_parent_writes_to_a_dead_worker() -> None:
    with trio.fail_after(30):
        async with fast_pool() as pool:
            victim = pool.workers()[0].pid
            values: dict[int, Any] = {}
            os.kill(victim, signal.SIGKILL)  # not yet noticed: the pool still routes calls to it

            async def call(i: int) -> None:
                values[i] = await pool.call("echo", {"value": i})  # not idempotent

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(call, i)
            # every call written to the dead worker was never acked: re-dispatched, none lost
            assert values == {i: i for i in range(40)}
            stats = pool.statistics()
            assert stats.redispatched >= 1 and stats.failed == 0, stats
            await assert_consistent(pool)
            assert pool.statistics().restarts == 1 and victim not in ready_pids(pool)


@BOTH_LAUNCHERS
async def test_fault_05_broken_pipe_workers_writing_to_a_gone_parent_exit(launcher: str) -> None:
    with trio.fail_after(40):
        async with parent_script(launcher, "write") as (process, tag, report, _buffer):
            assert len(report["workers"]) == 2 and all(pid_alive(p) for p in report["workers"])
            await trio.sleep(0.2)  # workers busy writing results and stderr to the parent
            process.kill()
            took = await assert_all_gone(tag, 1.0)
            assert took < 1.0


# -- 6. corrupt frames -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 9, 70_000], ids=["one-byte", "a-header", "large"])
async def test_fault_06_corrupt_frames_fail_the_victims_calls_only(size: int) -> None:
    with trio.fail_after(30):
        async with fast_pool() as pool:
            before = ready_pids(pool)
            outcomes: list[tuple[str, Any]] = []

            async def sleeper() -> None:
                outcomes.append(await settle(lambda: pool.call("sleep", {"seconds": 1.0})))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(sleeper)
                await wait_until(lambda: [w.in_flight for w in pool.statistics().workers] == [2, 2], 5)
                kind, exc = await settle(lambda: pool.call("garbage", {"bytes": size}))
            assert kind == "error" and isinstance(exc, ProtocolError), (kind, exc)
            assert exc.started  # acked before it wrote the garbage: not re-dispatched
            errors = [e for k, e in outcomes if k == "error"]
            assert len(errors) == 2 and all(isinstance(e, ProtocolError) for e in errors), outcomes
            assert sorted(v for k, v in outcomes if k == "ok") == [1.0, 1.0]
            await assert_consistent(pool)
            assert pool.statistics().restarts == 1 and len(ready_pids(pool) & before) == 1


# -- 7. pipe-buffer pressure: a stderr flood -----------------------------------------------------------------


async def test_fault_07_stderr_flood_does_not_stall_the_pool() -> None:
    with trio.fail_after(40):
        async with fast_pool() as pool:
            latencies: list[float] = []
            async with trio.open_nursery() as nursery:
                flooding: list[tuple[str, Any]] = []

                async def flood() -> None:
                    flooding.append(await settle(lambda: pool.call("spew_stderr", {"bytes": 20_000_000})))

                nursery.start_soon(flood)
                nursery.start_soon(flood)  # both workers flood
                await wait_until(lambda: pool.statistics().in_flight == 2, 5)
                for i in range(300):
                    start = time.monotonic()
                    assert await pool.call("echo", {"value": i}) == i
                    latencies.append(time.monotonic() - start)
            assert flooding == [("ok", 20_000_000)] * 2
            latencies.sort()
            assert latencies[len(latencies) // 2] < 0.05 and latencies[-1] < 1.0, latencies[-5:]
            assert pool.statistics().restarts == 0


# -- 8. stray writes to fd 1 -------------------------------------------------------------------------------


async def test_fault_08_stray_stdout_writes_never_corrupt_the_stream() -> None:
    with trio.fail_after(40):
        async with fast_pool() as pool:
            values: dict[int, Any] = {}

            async def echo(i: int) -> None:
                values[i] = await pool.call("echo", {"value": {"i": i, "pad": "y" * (i % 7) * 1000}})

            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(pool.call, "spew_stdout", {"bytes": 5_000_000})
                for i in range(400):
                    nursery.start_soon(echo, i)
            assert values == {i: {"i": i, "pad": "y" * (i % 7) * 1000} for i in range(400)}
            stats = pool.statistics()
            assert stats.failed == 0 and stats.restarts == 0
            assert sum(w.late_frames for w in stats.workers) == 0


# -- 9. unserializable values, both directions -------------------------------------------------------------


async def test_fault_09_unserializable_params_and_results_are_invalid_params() -> None:
    with trio.fail_after(30):
        async with fast_pool() as pool:
            served = sum(w.calls_served + w.calls_failed for w in pool.statistics().workers)
            for bad in (object(), {"k": {1, object()}}):
                with pytest.raises(InvalidParams, match=r"(?i)encode"):
                    await pool.call("echo", {"value": bad})
            # what the codec does carry comes back intact
            assert await pool.call("echo", {"value": b"\xff\x00"}) == b"\xff\x00"
            assert math.isnan(await pool.call("echo", {"value": float("nan")}))
            # nothing unencodable was ever sent: the workers saw only the two encodable calls
            sent = sum(w.calls_served + w.calls_failed for w in pool.statistics().workers) - served
            assert sent == 2, sent
            with pytest.raises(InvalidParams, match=r"(?i)encod"):
                await pool.call("unencodable")
            program = await pool.create_program("question -> answer", session="s9")
            with pytest.raises(InvalidParams):
                await pool.execute(program, {"question": object()}, session="s9")
            await assert_consistent(pool)
            stats = pool.statistics()
            assert stats.restarts == 0 and stats.circuit == CircuitState.CLOSED


# -- 10. start-up failures ---------------------------------------------------------------------------------


def _wrapper(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python-wrapper"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("how", ["import_error", "crash_before_hello", "slow_start"])
async def test_fault_10_start_up_failures_open_the_circuit(how: str, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"restart_intensity": 1, "probe_backoff": 30}
    if how == "import_error":
        python = _wrapper(tmp_path, f'exec {sys.executable} -c "import no_such_module_for_dspex" "$@"')
        kwargs["launcher"] = SubprocessLauncher(python=python)
        expected = "exit code 1"
    elif how == "crash_before_hello":
        kwargs["fail_at_start"] = 3
        expected = "exit code 3"
    else:  # the wrapper sleeps past the deadline (a grandchild of ours in the worker's group)
        python = _wrapper(tmp_path, f'sleep 30\nexec {sys.executable} "$@"')
        kwargs["launcher"] = SubprocessLauncher(python=python)
        kwargs["start_timeout"] = 0.5
        expected = "no hello within 0.5 s"
    with trio.fail_after(30):
        start = time.monotonic()
        async with fast_pool(**kwargs) as pool:
            opened = time.monotonic() - start
            stats = pool.statistics()
            assert stats.circuit == CircuitState.OPEN and stats.ready == 0 and stats.workers == ()
            assert expected in stats.circuit_reason, stats.circuit_reason
            assert opened < 5, opened
            with pytest.raises(PoolUnavailable) as info:
                await pool.call("echo", {"value": 1})
            assert expected in info.value.reason
        assert not child_processes()


# -- 11. retirement racing with new calls -------------------------------------------------------------------


async def test_fault_11_retirement_after_every_call_races_with_new_calls() -> None:
    with trio.fail_after(40):
        async with fast_pool(max_calls_per_worker=1) as pool:
            values: dict[int, Any] = {}
            most_processes = 0
            stop = trio.Event()

            async def lane(k: int) -> None:
                for i in range(k, 160, 16):
                    values[i] = await pool.call("echo", {"value": i})  # not idempotent

            async def count_processes() -> None:
                nonlocal most_processes
                while not stop.is_set():
                    most_processes = max(most_processes, len(live_worker_processes(pool)))
                    await trio.sleep(0.005)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(count_processes)
                async with trio.open_nursery() as lanes:
                    for k in range(16):
                        lanes.start_soon(lane, k)
                stop.set()
            assert values == {i: i for i in range(160)}  # no call failed
            stats = pool.statistics()
            assert stats.failed == 0 and stats.completed == 160 and stats.restarts == 0
            assert stats.recycled >= 5, stats.recycled
            # a retiring worker drains while its replacement starts: at most one extra per slot each time,
            # and each retiring worker ran at most its capacity of calls concurrently
            assert most_processes <= 2 + stats.recycled, most_processes
            await assert_consistent(pool)


# -- 12. restart storms ---------------------------------------------------------------------------------------


async def test_fault_12_workers_killed_as_soon_as_they_start_trip_the_budget() -> None:
    intensity = 3
    backoff = 2.0  # the first probe is due this long after the trip
    with trio.fail_after(30):
        async with fast_pool(restart_intensity=intensity, restart_period=10, probe_backoff=backoff) as pool:
            killing = True
            killed: list[int] = []
            ready_at: list[float] = []

            def killer(worker: dspex_trio.Worker, old: WorkerState, new: WorkerState, why: str) -> None:
                if new is WorkerState.READY:
                    ready_at.append(time.monotonic())
                    if killing:
                        os.kill(worker.pid, signal.SIGKILL)
                        killed.append(worker.pid)

            pool._transition_hooks.append(killer)
            for worker in pool.workers():  # the first two, too (they served no call)
                os.kill(worker.pid, signal.SIGKILL)
                killed.append(worker.pid)
            await wait_until(lambda: pool.statistics().circuit == CircuitState.OPEN, 10)
            tripped = time.monotonic()
            assert "budget" in pool.statistics().circuit_reason
            with pytest.raises(PoolUnavailable):
                await pool.call("echo", {"value": 1})
            # the budget, plus at most one start per other slot that was under way at the trip: wait for
            # those to end (however slow the machine): then both slots wait for the circuit
            await wait_until(lambda: pool._waiting_slots == 2, 10, lambda: f"live: {pool.workers()}")
            at_trip = len(killed)
            assert intensity + 1 <= at_trip <= intensity + 2, killed
            killing = False  # the cause is gone: the next probe succeeds, the circuit closes
            quiet = len(ready_at)
            await wait_until(lambda: pool.statistics().circuit == CircuitState.CLOSED, 15)
            # no start while open: the starts under way at the trip were killed above; the next worker to
            # become ready is the probe's, which is not due before the backoff
            after = [t - tripped for t in ready_at[quiet:]]
            assert after and min(after) >= backoff - 0.5, after
            await assert_consistent(pool)
            assert not any(pid_alive(pid) for pid in killed)


# -- 13. the parent is SIGKILLed ---------------------------------------------------------------------------


@BOTH_LAUNCHERS
async def test_fault_13_parent_sigkill_with_calls_in_flight_leaves_nothing(launcher: str) -> None:
    with trio.fail_after(40):
        async with parent_script(launcher, "sleep") as (process, tag, report, _buffer):
            everything = tagged_processes(tag)
            assert set(report["workers"]) | set(report["grandchildren"]) <= everything
            process.kill()
            assert await process.wait() == -signal.SIGKILL
            took = await assert_all_gone(tag, 1.0)
            assert took < 1.0


# -- 14. Ctrl-C / SIGTERM to the process group ----------------------------------------------------------------


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
async def test_fault_14_signal_to_the_process_group_shuts_down_cleanly(signum: int, status: int) -> None:
    with trio.fail_after(40):
        async with parent_script("zygote", "sleep", new_session=True) as (process, tag, _report, buffer):
            start = time.monotonic()
            os.killpg(process.pid, signum)  # the script's group; workers have their own groups
            assert process.stdout is not None
            final = await read_json_line(process.stdout, buffer, 10)
            code = await process.wait()
            elapsed = time.monotonic() - start
            assert code == status, (code, final)
            if signum == signal.SIGINT:
                assert final == {"interrupted": True}
            else:
                # every call in flight ended (cancelled by the handler), nothing is left running
                assert final["outcomes"] == ["cancelled"] and final["in_flight"] == 0, final
            assert elapsed < 5, elapsed
            await assert_all_gone(tag, 1.0)


# -- 15. grandchildren die with their worker ---------------------------------------------------------------


@BOTH_LAUNCHERS
@pytest.mark.parametrize("how", ["sigkill", "crash", "pool_close"])
async def test_fault_15_grandchildren_die_with_their_worker(launcher: str, how: str) -> None:
    with trio.fail_after(30):
        async with fast_pool(launcher=launcher) as pool:
            worker = pool.workers()[0]
            grandchild = await worker.call("spawn_child")
            other = await pool.workers()[1].call("spawn_child")
            assert pid_alive(grandchild) and pid_alive(other)
            if how == "pool_close":
                pass
            elif how == "sigkill":
                os.kill(worker.pid, signal.SIGKILL)  # the worker only, not its group
            else:
                with pytest.raises(WorkerCrashed):
                    await worker.call("crash", {"exit_code": 5})
            if how != "pool_close":
                await wait_until(lambda: not pid_alive(grandchild), 2)
                assert pid_alive(other)  # another worker's grandchild is untouched
                await assert_consistent(pool)
        await wait_until(lambda: not pid_alive(grandchild) and not pid_alive(other), 2)
        assert not child_processes()


# -- 16. no fd, thread or process leaks after success, failure and shutdown -------------------------------------


@BOTH_LAUNCHERS
async def test_fault_16_no_leaks_after_success_failure_and_shutdown(launcher: str) -> None:
    async def cycle() -> None:
        async with fast_pool(launcher=launcher, heartbeat_interval=0.1) as pool:
            assert await pool.call("echo", {"value": 1}) == 1
            killed = pool.workers()[0].pid
            os.kill(killed, signal.SIGKILL)  # death
            with pytest.raises(WorkerCrashed):
                await pool.workers()[1].call("crash", {"exit_code": 2})  # crash
            # both replaced (the killed one may still look ready until its death is noticed)
            await wait_until(lambda: len(ready_pids(pool)) == 2 and killed not in ready_pids(pool), 10)
            with pytest.raises(ProtocolError):
                await pool.workers()[0].call("garbage", {"bytes": 16})  # protocol error
            await wait_until(lambda: len(ready_pids(pool)) == 2, 10)
            with trio.move_on_after(0.05):
                await pool.call("sleep", {"seconds": 5})  # cancelled
            await pool.call("spawn_child")
            # shutdown with a call in flight
            async with trio.open_nursery() as nursery:
                nursery.start_soon(settle, lambda: pool.call("sleep", {"seconds": 0.05}))
                await trio.sleep(0.01)
        assert not child_processes(), child_processes()  # no zombie, no live child

    with trio.fail_after(60):
        await cycle()  # warm-up
        fds = open_fds()
        threads = threading.active_count()
        for _ in range(3):
            await cycle()
        await wait_until(
            lambda: threading.active_count() <= threads, 15, lambda: f"{threading.active_count()}"
        )
        after = open_fds()
        assert len(after) <= len(fds), {fd: t for fd, t in after.items() if fds.get(fd) != t}


# -- 17. graceful shutdown with calls in flight --------------------------------------------------------------


async def test_fault_17_graceful_shutdown_with_calls_in_flight() -> None:
    grace = 0.5
    outcomes: dict[str, list[tuple[str, Any]]] = {"short": [], "long": []}
    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            async with fast_pool(drain_grace=grace) as pool:
                transitions = Transitions(pool)
                pids = ready_pids(pool)

                async def call(kind: str, seconds: float) -> None:
                    outcomes[kind].append(await settle(lambda: pool.call("sleep", {"seconds": seconds})))

                for _ in range(3):
                    outer.start_soon(call, "short", 0.2)
                    outer.start_soon(call, "long", 20)
                # all six sent (a short one may have ended already if this machine stalled for 0.2 s:
                # it then finished before the drain, which the outcomes below accept as well)
                await wait_until(
                    lambda: pool.statistics().in_flight + len(outcomes["short"]) == 6,
                    30,
                    lambda: f"{pool.statistics()} {outcomes}",
                )
                start = time.monotonic()
            elapsed = time.monotonic() - start
            stats = pool.statistics()
            with pytest.raises(WorkerClosed):
                await pool.call("echo", {"value": 1})
    # the short calls finished within the grace; the long ones were ended by it, as WorkerClosed
    assert outcomes["short"] == [("ok", 0.2)] * 3
    assert len(outcomes["long"]) == 3
    for kind, exc in outcomes["long"]:
        assert kind == "error" and type(exc) is WorkerClosed, exc
    assert grace <= elapsed < grace + 2.0, elapsed
    assert stats.in_flight == 0 and stats.completed == 3 and stats.failed == 3
    drained = {t[0] for t in transitions.to(WorkerState.DRAINING)}
    ended = {t[0]: t[3] for t in transitions.seen if t[3] in (WorkerState.STOPPED, WorkerState.FAILED)}
    assert drained == set(ended) and len(ended) == 2
    assert set(ended.values()) == {WorkerState.STOPPED}, transitions.seen  # clean exits, no kill
    assert not any(pid_alive(pid) for pid in pids) and not child_processes()
