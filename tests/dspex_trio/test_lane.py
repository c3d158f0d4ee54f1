"""The worker's CPU lane: CPU-bound calls run one at a time on the reader thread, which a standby thread
relieves when one runs long (``bridge_child._lane``). Real processes, real time: every wait is bounded.

What must hold: offline-LM executions take the lane and real-LM ones the thread pool, with the LM
configured when they were read; a long lane call does not silence the worker (pings, acks and cancels
keep flowing); the lane is serial; a cancelled lane call stops, queued or running, and one that ignores
its cancellation does not hold up the calls behind it; every lane call gets exactly one outcome, after
its ack, also when a method raises ``SystemExit`` and when a relieved thread drains the lane; a closing
worker finishes its queued lane calls within the grace and writes the results it holds.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import dspex_trio
from bridge_child import _programs, wire
from bridge_child._context import CallContext
from bridge_child.wire import Call
from dspex_trio import CallTimeout, DspexError, ProtocolError, Worker, WorkerError, WorkerState, open_worker
from tests.dspex_trio.test_worker import stats, wait_executing
from tests.helpers import wait_until

RELIEF_BOUND_S = 1.0
"""Generous upper bound for an inline call answered while a lane call runs (relief takes ~25-50 ms)."""


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    async with open_worker(diagnostics=True) as w:
        yield w


# -- which calls take the lane ---------------------------------------------------------------------


class _StubWorker:
    def __init__(self, lm_config: Any = None) -> None:
        self.state: dict[str, Any] = {} if lm_config is None else {"lm_config": lm_config}


def _ctx(params: Any) -> CallContext:
    return CallContext(Call(1, "execute", params), lambda ctx, data: None)


@pytest.mark.parametrize(
    ("worker_lm", "call_lm", "on_lane"),
    [
        (None, None, True),  # the default LM is the offline one
        (None, "offline", True),
        (None, {"model": "offline", "temperature": 0.5}, True),
        (None, {"model": "openai/gpt-4o-mini", "api_base": "http://x"}, False),
        (None, "openai/gpt-4o-mini", False),
        ({"model": "openai/gpt-4o-mini"}, None, False),  # the worker's configured LM is real
        ({"model": "openai/gpt-4o-mini"}, {"model": "offline"}, True),  # the call's LM wins
        ({"model": "offline"}, None, True),
    ],
)
def test_executions_take_the_lane_exactly_when_their_lm_is_the_offline_one(
    worker_lm: Any, call_lm: Any, on_lane: bool
) -> None:
    params: dict[str, Any] = {"program": {"id": "p", "version": 1}, "inputs": {}}
    if call_lm is not None:
        params["lm"] = call_lm
    assert _programs.on_cpu_lane(_StubWorker(worker_lm), _ctx(params)) is on_lane  # type: ignore[arg-type]


@pytest.mark.parametrize("params", [None, [], "x", {"lm": 3}, {"lm": {"temperature": 1}}])
def test_malformed_execute_params_are_left_to_the_method(params: Any) -> None:
    """The lane check never raises: whatever it says, ``execute`` itself reports the bad params."""
    from bridge_child._server import Worker as ChildWorker

    child = ChildWorker.__new__(ChildWorker)
    child.state = {}
    method = _programs.METHODS["execute"]
    assert child._on_lane(_ctx(params), method) in (True, False)


async def test_offline_executions_run_on_the_lane_and_http_ones_in_the_pool() -> None:
    from dspex_trio.testing import open_fake_lm

    with trio.fail_after(60):
        async with open_fake_lm() as fake, dspex_trio.open_pool(workers=1) as pool:
            pid = await pool.create_program("question -> answer", module="chain_of_thought")
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(pool.execute, pid, {"question": f"q{i}"})
            offline = await pool.call("stats")
            assert offline["lane_calls"] == 8
            assert offline["completed"] >= 8 and offline["failed"] == 0

            await pool.configure_lm(
                "openai/fake", api_base=fake.url, api_key="k", num_retries=0, session="http"
            )
            http_pid = await pool.create_program("question -> answer", session="http")
            outputs: list[dict[str, Any]] = []

            async def http_call(i: int) -> None:
                outputs.append(await pool.execute(http_pid, {"question": f"q{i}"}, session="http"))

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(http_call, i)
            assert len(outputs) == 4 and all(o["answer"] for o in outputs)
            assert fake.requests >= 4
            after = await pool.call("stats")
            assert after["lane_calls"] == 8  # none of the HTTP executions took the lane


# -- a long lane call does not silence the worker -----------------------------------------------------


async def test_a_long_lane_call_is_relieved_so_pings_acks_and_other_calls_flow(worker: Worker) -> None:
    with trio.fail_after(30):
        result: dict[str, Any] = {}

        async def long() -> None:
            result["n"] = await worker.call("cpu", {"seconds": 2.0, "lane": True})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long)
            await wait_executing(worker, 1)
            for i in range(5):  # inline calls: answered by the relief reader, not after the 2 s
                start = trio.current_time()
                assert await worker.call("echo", {"value": i}) == i
                assert trio.current_time() - start < RELIEF_BOUND_S
            start = trio.current_time()  # a pool call is read, acked and run meanwhile
            assert await worker.call("sleep", {"seconds": 0.01}) == 0.01
            assert trio.current_time() - start < RELIEF_BOUND_S
            during = await stats(worker)
        assert result["n"] > 0
        assert during["reliefs"] >= 1
        assert during["lane_calls"] == 1
        assert worker.state is WorkerState.READY
        # after the relief the threads swapped roles; lane calls still run and answer
        assert await worker.call("cpu", {"seconds": 0.01, "lane": True}) > 0


async def test_heartbeats_keep_a_worker_with_a_long_lane_call_alive() -> None:
    with trio.fail_after(30):
        async with open_worker(diagnostics=True, heartbeat_interval=0.2, heartbeat_missed=3) as worker:
            assert await worker.call("cpu", {"seconds": 1.5, "lane": True}) > 0
            assert worker.state is WorkerState.READY
            assert worker.statistics().calls_failed == 0


async def test_the_lane_is_serial(worker: Worker) -> None:
    with trio.fail_after(30):
        ids: list[int] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker.call, "cpu", {"seconds": 0.6, "lane": True})
            start = trio.current_time()
            (running,) = await wait_executing(worker, 1)
            snapshot = await stats(worker)
            assert len(snapshot["pending"]) == 3 and running in snapshot["pending"]
            ids.append(running)
        assert trio.current_time() - start >= 1.0  # 3 x 0.6 s one after the other, seen from the first
        assert (await stats(worker))["lane_calls"] == 3


# -- cancellation ------------------------------------------------------------------------------------


async def test_a_running_lane_call_stops_when_its_caller_times_out(worker: Worker) -> None:
    with trio.fail_after(30):
        before = await stats(worker)
        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await worker.call("cpu", {"seconds": 30, "lane": True}, timeout=0.5)
        assert trio.current_time() - start < 0.5 + RELIEF_BOUND_S

        async def stopped() -> bool:
            now = await stats(worker)
            return not now["executing"] and not now["pending"] and now["cancelled"] > before["cancelled"]

        await wait_until(stopped, 5.0, "the cancelled lane call kept running")
        assert await worker.call("cpu", {"seconds": 0.01, "lane": True}) > 0


async def test_a_queued_lane_call_cancelled_before_it_starts_never_runs(worker: Worker) -> None:
    with trio.fail_after(30):
        outcomes: dict[str, Any] = {}

        async def first() -> None:
            outcomes["first"] = await worker.call("cpu", {"seconds": 1.0, "lane": True})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            (first_id,) = await wait_executing(worker, 1)
            with pytest.raises(CallTimeout):
                await worker.call("raise", {"kind": "SystemExit", "lane": True}, timeout=0.2)
            assert (await stats(worker))["executing"] == [first_id]
        assert outcomes["first"] > 0
        after = await stats(worker)
        assert after["executing"] == [] and after["pending"] == []
        # the queued call was skipped, not run: it raised nothing the worker reported as failed
        assert after["failed"] == 0 and after["cancelled"] == 1


# -- every call one outcome ---------------------------------------------------------------------------


@pytest.mark.parametrize("lane", [False, True], ids=["pool", "lane"])
@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "RuntimeError"])
async def test_any_exception_fails_its_call_and_not_the_worker(worker: Worker, kind: str, lane: bool) -> None:
    with trio.fail_after(15):
        with pytest.raises(WorkerError) as info:
            await worker.call("raise", {"kind": kind, "message": "boom", "lane": lane})
        assert info.value.error_type == kind
        assert "boom" in str(info.value)
        assert await worker.call("echo", {"value": "alive"}) == "alive"
        assert await worker.call("cpu", {"seconds": 0.01, "lane": True}) > 0


async def test_mixed_lane_pool_and_inline_calls_each_get_their_own_outcome(worker: Worker) -> None:
    with trio.fail_after(60):
        got: dict[tuple[str, int], Any] = {}

        async def one(kind: str, i: int) -> None:
            try:
                if kind == "lane":
                    got[kind, i] = await worker.call("cpu", {"seconds": 0.002, "lane": True})
                elif kind == "pool":
                    got[kind, i] = await worker.call("sleep", {"seconds": 0.001 * (i % 5)})
                elif kind == "echo":
                    got[kind, i] = await worker.call("echo", {"value": i})
                else:
                    got[kind, i] = await worker.call("raise", {"kind": "RuntimeError", "lane": True})
            except DspexError as exc:
                got[kind, i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(60):
                for kind in ("lane", "pool", "echo", "fail"):
                    nursery.start_soon(one, kind, i)
        assert len(got) == 240
        for (kind, i), value in got.items():
            if kind == "lane":
                assert isinstance(value, int) and value > 0
            elif kind == "pool":
                assert value == 0.001 * (i % 5)
            elif kind == "echo":
                assert value == i
            else:
                assert isinstance(value, WorkerError) and value.error_type == "RuntimeError"
        final = await stats(worker)
        assert final["lane_calls"] == 120
        assert final["executing"] == [] and final["pending"] == []
        assert worker.statistics().late_frames == 0


# -- shutdown ------------------------------------------------------------------------------------------


async def test_closing_finishes_the_queued_lane_calls_within_the_grace() -> None:
    results: list[Any] = []
    with trio.fail_after(30):
        async with (
            trio.open_nursery() as nursery,
            open_worker(diagnostics=True, shutdown_grace=10.0) as worker,
        ):

            async def one() -> None:
                results.append(await worker.call("cpu", {"seconds": 0.2, "lane": True}))

            for _ in range(4):
                nursery.start_soon(one)
            await wait_until(lambda: worker.in_flight == 4, 5.0)
            await wait_executing(worker, 1)
    assert len(results) == 4 and all(isinstance(n, int) and n > 0 for n in results)
    assert worker.state is WorkerState.STOPPED


# -- raw frames: ordering and shutdown (found in review) -------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F_SETPIPE_SZ = 1031


def _spawn() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge_child", "--diagnostics"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def test_a_lane_result_never_precedes_its_ack_while_a_relieved_runner_drains() -> None:
    """A relieved thread draining the lane must not run (and answer) a call whose ack the new reader
    has not written yet. The sleep only aims the burst at the moment the long call ends; if it misses,
    the test passes without having provoked the race (it cannot fail spuriously)."""
    n_echo = 8000
    proc = _spawn()
    try:
        try:  # room for one large read, so the reader dispatches many frames before it flushes
            fcntl.fcntl(proc.stdin.fileno(), F_SETPIPE_SZ, 1 << 20)  # type: ignore[union-attr]
        except OSError:
            pass
        conn = wire.Connection(wire.Role.PARENT, check_states=False)
        frames: list[Any] = []
        done = threading.Event()

        def read() -> None:
            terminals = 0
            while terminals < 2 + n_echo:
                data = os.read(proc.stdout.fileno(), 1 << 20)  # type: ignore[union-attr]
                if not data:
                    break
                conn.receive_data(data)
                while (m := conn.next_event()) is not wire.NEED_DATA:
                    frames.append(m)
                    terminals += isinstance(m, wire.Result | wire.Error)
            done.set()

        threading.Thread(target=read, daemon=True).start()
        stdin = proc.stdin.fileno()  # type: ignore[union-attr]
        # a long lane call: the standby relieves the reader; the relieved thread will drain the lane
        _write(stdin, wire.encode_frame(wire.Call(1, "cpu", {"seconds": 0.15, "lane": True})))
        time.sleep(0.11)  # relieved by now (25-50 ms); the call ends at ~0.15 s
        # one read for the new reader: a quick lane call, then many inline calls to dispatch before
        # its flush; the long call ends meanwhile and its thread drains the lane
        chunk = [wire.encode_frame(wire.Call(2, "raise", {"lane": True, "message": "x"}))]
        chunk += [wire.encode_frame(wire.Call(i, "echo", {"value": i})) for i in range(3, 3 + n_echo)]
        _write(stdin, b"".join(chunk))
        assert done.wait(60), "not every call was answered"
    finally:
        proc.kill()
        proc.wait()
    first: dict[int, Any] = {}
    for m in frames:
        if not isinstance(m, wire.Hello):
            first.setdefault(m.id, m)
    out_of_order = {i: type(m).__name__ for i, m in first.items() if not isinstance(m, wire.Ack)}
    assert out_of_order == {}, f"terminal frame before the ack: {out_of_order}"


async def test_the_parent_keeps_a_worker_whose_relieved_runner_drains_the_lane() -> None:
    """The same race through the real parent: lane and inline calls arrive while a relieved runner
    starts draining the lane. Up to 8 short cycles (a long lane call, relieved, then a burst). On a
    loaded machine the 0.1 s call may end before the standby thread got to run and relieve it: that
    cycle provokes nothing and the next one tries again (it cannot fail spuriously)."""
    failures: list[str] = []
    with trio.fail_after(120):
        # Only a protocol error may lose this worker: a stall of a loaded machine must not get it killed
        # by the heartbeat or ack detectors (they have tests of their own), so both are generous.
        async with open_worker(diagnostics=True, heartbeat_missed=30, ack_timeout=30) as worker:

            async def one(method: str, params: Any) -> None:
                try:
                    await worker.call(method, params)
                except ProtocolError as exc:
                    failures.append(str(exc))
                except DspexError:
                    pass  # the raise diagnostic's own error, or calls cut off with the worker

            def alive() -> bool:
                return worker.state in (WorkerState.READY, WorkerState.BUSY)

            for _cycle in range(8):
                reliefs = (await worker.call("stats"))["reliefs"]
                long_call_done = trio.Event()

                async def long_call(done: trio.Event = long_call_done) -> None:
                    await one("cpu", {"seconds": 0.1, "lane": True})
                    done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(long_call)

                    async def relieved_or_done(
                        before: int = reliefs, done: trio.Event = long_call_done
                    ) -> bool:
                        if not alive() or done.is_set():
                            return True
                        return bool((await worker.call("stats"))["reliefs"] != before)

                    await wait_until(
                        relieved_or_done, 30.0, "the long lane call neither ended nor was relieved"
                    )
                    if long_call_done.is_set() and alive():
                        continue  # ended before its relief: nothing to aim the burst at this time
                    end = trio.current_time() + 0.12
                    while alive() and trio.current_time() < end:
                        for i in range(30):
                            nursery.start_soon(one, "echo", {"value": i})
                            nursery.start_soon(one, "raise", {"lane": True, "message": "x"})
                        await trio.sleep(0.003)
                if failures or not alive():
                    break
    assert failures == [], failures[0]
    assert worker.state is not WorkerState.FAILED


def test_a_finished_lane_call_gets_its_result_when_the_shutdown_grace_ends() -> None:
    proc = _spawn()
    try:
        conn = wire.Connection(wire.Role.PARENT, check_states=False)
        _write(
            proc.stdin.fileno(),  # type: ignore[union-attr]
            b"".join(
                wire.encode_frame(m)
                for m in (
                    wire.Call(1, "raise", {"lane": True, "message": "done"}),  # finishes at once
                    wire.Call(2, "cpu", {"seconds": 1.0, "lane": True}),  # still running at the end
                    wire.Shutdown(0.005),
                )
            ),
        )
        frames: list[Any] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
            if not data:
                break
            conn.receive_data(data)
            while (m := conn.next_event()) is not wire.NEED_DATA:
                frames.append(m)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()
    terminals = [m for m in frames if isinstance(m, wire.Result | wire.Error)]
    # call 1 finished long before the grace ended (as it does in the pool, lane: false)
    assert [m.id for m in terminals] == [1], f"frames: {frames}"


def _read_frames_until(
    proc: subprocess.Popen[bytes], conn: wire.Connection, done: Any, seconds: float
) -> list[Any]:
    frames: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done(frames):
        data = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
        if not data:
            break
        conn.receive_data(data)
        while (m := conn.next_event()) is not wire.NEED_DATA:
            frames.append(m)
    return frames


def test_an_execute_runs_with_the_lm_configured_when_it_was_read() -> None:
    """``execute`` then ``configure_lm`` (a real LM, unreachable) in one write: the execute was read
    first, so it runs with the offline LM; the next execute uses the new LM (and fails to reach it)."""
    program = {"id": "p", "version": 1, "spec": {"signature": "question -> answer", "module": "predict"}}
    real = {"model": "openai/nowhere", "api_base": "http://127.0.0.1:9/v1", "api_key": "k", "num_retries": 0}
    proc = _spawn()
    try:
        conn = wire.Connection(wire.Role.PARENT, check_states=False)
        _write(
            proc.stdin.fileno(),  # type: ignore[union-attr]
            b"".join(
                wire.encode_frame(m)
                for m in (
                    wire.Call(1, "execute", {"program": program, "inputs": {"question": "q"}}),
                    wire.Call(2, "configure_lm", {"lm": real}),
                    wire.Call(3, "execute", {"program": program, "inputs": {"question": "q"}}),
                )
            ),
        )

        def three_terminals(frames: list[Any]) -> bool:
            return sum(isinstance(m, wire.Result | wire.Error) for m in frames) == 3

        frames = _read_frames_until(proc, conn, three_terminals, 60)
    finally:
        proc.kill()
        proc.wait()
    terminals = {m.id: m for m in frames if isinstance(m, wire.Result | wire.Error)}
    assert isinstance(terminals[1], wire.Result), terminals[1]
    assert terminals[1].value["outputs"]["answer"]
    assert isinstance(terminals[2], wire.Result)
    assert isinstance(terminals[3], wire.Error) and terminals[3].code == wire.ErrorCode.PROGRAM_ERROR


async def test_a_lane_call_ignoring_its_cancellation_does_not_hold_up_the_lane(worker: Worker) -> None:
    with trio.fail_after(30):
        with pytest.raises(CallTimeout):
            await worker.call("cpu", {"seconds": 4.0, "lane": True, "ignore_cancel": True}, timeout=0.3)
        start = trio.current_time()
        # the stuck call still runs; calls behind it leave the lane for the thread pool
        results = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):

                async def one() -> None:
                    results.append(await worker.call("cpu", {"seconds": 0.01, "lane": True}))

                nursery.start_soon(one)
        assert trio.current_time() - start < 2.5
        assert len(results) == 3 and all(n > 0 for n in results)
        snapshot = await stats(worker)
        assert snapshot["lane_spilled"] >= 1
        assert len(snapshot["executing"]) == 1  # the stuck one, abandoned, still running
