"""The worker's CPU lane: CPU-bound calls run one at a time on the reader thread, which a standby thread
relieves when one runs long (``bridge_child._server``). Real processes, real time: every wait is bounded.

What must hold: offline-LM executions take the lane and real-LM ones the thread pool; a long lane call
does not silence the worker (pings, acks and cancels keep flowing); the lane is serial; a cancelled lane
call stops, queued or running; every lane call gets exactly one outcome, also when a method raises
``SystemExit``; a closing worker finishes its queued lane calls within the grace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import dspex_trio
from bridge_child import _programs
from bridge_child._context import CallContext
from bridge_child.wire import Call
from dspex_trio import CallTimeout, DspexError, Worker, WorkerError, WorkerState, open_worker
from tests.helpers import wait_until

RELIEF_BOUND_S = 1.0
"""Generous upper bound for an inline call answered while a lane call runs (relief takes ~25-50 ms)."""


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    async with open_worker(diagnostics=True) as w:
        yield w


async def stats(worker: Worker) -> dict[str, Any]:
    result: dict[str, Any] = await worker.call("stats")
    return result


async def wait_executing(worker: Worker, count: int) -> list[int]:
    seen: list[int] = []

    async def executing() -> bool:
        seen[:] = (await stats(worker))["executing"]
        return len(seen) == count

    await wait_until(executing, 10.0, lambda: f"expected {count} executing calls, saw {seen}")
    return list(seen)


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
    from dspex_trio._fake_lm import open_fake_lm

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
