"""Tests of one worker handle (``open_worker``) against real ``python -m bridge_child`` processes.

Real processes mean real time: no autojump clock. Every wait is a bounded poll (``helpers.wait_until``)
or a ``trio.fail_after``; timing asserts are generous upper bounds (and lower bounds that follow from a
configured grace), so the file stays robust on a loaded 2-core machine.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from dspex_trio import (
    CallTimeout,
    DspexError,
    ExitStatus,
    InvalidParams,
    ProgramError,
    ProgramNotFound,
    ProtocolError,
    UnknownMethod,
    Worker,
    WorkerClosed,
    WorkerCrashed,
    WorkerError,
    WorkerStartFailed,
    WorkerState,
    WorkerUnresponsive,
    open_worker,
)
from dspex_trio._launcher import SubprocessLauncher
from tests.helpers import child_processes, kill_quietly, open_fds, pid_alive, process_state, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# -- fixtures and small helpers ---------------------------------------------------------------------


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    """A worker with the diagnostic methods, default options."""
    async with open_worker(diagnostics=True) as w:
        yield w


async def stats(worker: Worker) -> dict[str, Any]:
    """The worker's own view: ``executing``/``pending`` call ids and its counters."""
    result: dict[str, Any] = await worker.call("stats")
    return result


async def wait_executing(worker: Worker, count: int, timeout: float = 5.0) -> list[int]:
    """Wait until exactly ``count`` calls execute in the worker; return their ids."""
    seen: list[int] = []

    async def executing() -> bool:
        seen[:] = (await stats(worker))["executing"]
        return len(seen) == count

    await wait_until(executing, timeout, lambda: f"expected {count} executing calls, saw {seen}")
    return list(seen)


async def wait_stopped_in_worker(worker: Worker, call_ids: list[int], cancelled_at_least: int) -> None:
    """Wait until none of ``call_ids`` executes or is pending in the worker any more, and its
    ``cancelled`` counter reached ``cancelled_at_least``."""
    last: dict[str, Any] = {}

    async def stopped() -> bool:
        last.update(await stats(worker))
        busy = set(last["executing"]) | set(last["pending"])
        return not busy & set(call_ids) and last["cancelled"] >= cancelled_at_least

    await wait_until(
        stopped,
        5.0,
        lambda: (
            f"calls {call_ids} still running in the worker or not counted as cancelled "
            f"(executing {last.get('executing')}, pending {last.get('pending')}, "
            f"cancelled {last.get('cancelled')}, want >= {cancelled_at_least})"
        ),
    )


def assert_reaped(worker: Worker, signum: int | None = signal.SIGKILL) -> None:
    """The worker process is gone and reaped by us; it ended by ``signum`` (None: exit code 0)."""
    expected = ExitStatus(code=None, signal=signum) if signum is not None else ExitStatus(code=0, signal=None)
    assert worker.exit_status == expected
    assert process_state(worker.pid) is None, f"pid {worker.pid} still exists ({process_state(worker.pid)})"
    assert worker.pid not in child_processes()


class _CountingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def captured_worker_stderr() -> Iterator[_CountingHandler]:
    """Turn on the handle's re-logging of worker stderr (INFO) into a list, not pytest's capture."""
    log = logging.getLogger("dspex_trio.worker")
    handler = _CountingHandler()
    saved = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


# -- 1. many concurrent calls -----------------------------------------------------------------------


async def test_a_thousand_concurrent_calls_each_get_their_own_result(worker: Worker) -> None:
    rng = random.Random(1)
    expected: dict[int, Any] = {}
    requests: dict[int, tuple[str, dict[str, Any]]] = {}
    for i in range(1000):
        if i % 10 == 3:  # 100 sleeps of 0-50 ms, finishing out of order
            seconds = round(rng.uniform(0, 0.05), 4)
            requests[i] = ("sleep", {"seconds": seconds})
            expected[i] = seconds
        else:
            value = {"i": i, "s": f"value-{i}", "xs": list(range(i % 7))}
            requests[i] = ("echo", {"value": value})
            expected[i] = value
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        method, params = requests[i]
        results[i] = await worker.call(method, params)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in requests:
                nursery.start_soon(one, i)
    assert results == expected
    snapshot = worker.statistics()
    assert snapshot.in_flight == 0
    assert snapshot.calls_served == 1000
    assert snapshot.calls_failed == 0
    assert snapshot.state is WorkerState.READY


# -- 2. cancellation reaches the worker -------------------------------------------------------------


async def test_cancelling_the_caller_stops_the_call_in_the_worker(worker: Worker) -> None:
    with trio.fail_after(15):
        before = await stats(worker)
        outcome: dict[str, Any] = {}

        async def caller(scope: trio.CancelScope) -> None:
            with scope:
                outcome["value"] = await worker.call("sleep", {"seconds": 30})
            outcome["cancelled_caught"] = scope.cancelled_caught

        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, scope)
            (call_id,) = await wait_executing(worker, 1)
            scope.cancel()
        assert outcome == {"cancelled_caught": True}
        assert worker.in_flight == 0
        await wait_stopped_in_worker(worker, [call_id], before["cancelled"] + 1)
        # the worker's "cancelled" terminal frame for it arrives after the caller left: dropped, counted
        await wait_until(lambda: worker.statistics().late_frames == 1, 5.0)
        assert await worker.call("echo", {"value": "still fine"}) == "still fine"


async def test_call_timeout_raises_and_stops_the_call_in_the_worker(worker: Worker) -> None:
    with trio.fail_after(15):
        before = await stats(worker)
        raised: list[BaseException] = []

        async def caller() -> None:
            try:
                await worker.call("sleep", {"seconds": 30}, timeout=1.0)
            except DspexError as exc:
                raised.append(exc)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            (call_id,) = await wait_executing(worker, 1)
        elapsed = trio.current_time() - start
        assert len(raised) == 1
        assert type(raised[0]) is CallTimeout
        assert "sleep on worker" in str(raised[0]) and "timed out after 1.0 s" in str(raised[0])
        assert 1.0 <= elapsed < 3.0
        assert worker.in_flight == 0
        await wait_stopped_in_worker(worker, [call_id], before["cancelled"] + 1)
        assert worker.statistics().calls_failed == 1
        assert await worker.call("echo", {"value": "still fine"}) == "still fine"


# -- 3. a killed worker fails its calls -------------------------------------------------------------


async def test_sigkill_with_50_calls_in_flight_fails_them_all_promptly() -> None:
    errors: list[BaseException] = []
    with trio.fail_after(20):
        async with open_worker(diagnostics=True) as worker:

            async def one() -> None:
                try:
                    await worker.call("sleep", {"seconds": 30})
                except WorkerCrashed as exc:
                    errors.append(exc)
                    errors_at.append(trio.current_time())

            errors_at: list[float] = []
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(one)
                await wait_executing(worker, 50)
                os.kill(worker.pid, signal.SIGKILL)
                killed_at = trio.current_time()
            assert len(errors) == 50
            assert max(errors_at) - killed_at < 2.0
            for exc in errors:
                assert type(exc) is WorkerCrashed
                assert isinstance(exc, WorkerCrashed)
                assert "SIGKILL" in str(exc)
                assert exc.started is True
                assert exc.exit_status == ExitStatus(code=None, signal=signal.SIGKILL)
            assert worker.state is WorkerState.FAILED
            assert worker.in_flight == 0
            assert_reaped(worker)
            with pytest.raises(WorkerClosed):
                await worker.call("echo", {"value": 1})
        assert worker.state is WorkerState.FAILED


# -- 4. hung workers are detected -------------------------------------------------------------------


async def test_hung_worker_is_detected_by_the_ack_timeout() -> None:
    results: dict[str, BaseException] = {}
    with trio.fail_after(20):
        async with open_worker(diagnostics=True, ack_timeout=0.5, heartbeat_interval=10) as worker:

            async def one(name: str, method: str, params: Any) -> None:
                try:
                    await worker.call(method, params)
                except DspexError as exc:
                    results[name] = exc

            async with trio.open_nursery() as nursery:
                # `hang` is acked first (its ack is flushed before it blocks the worker's reader)...
                nursery.start_soon(one, "hang", "hang", None)
                await wait_until(lambda: worker.in_flight == 1, 5.0)
                start = trio.current_time()
                # ... so the next call is never acked: the ack timeout finds the worker wedged.
                nursery.start_soon(one, "echo", "echo", {"value": 1})
            elapsed = trio.current_time() - start
            assert elapsed < 0.5 + 2.0
            assert set(results) == {"hang", "echo"}
            assert type(results["echo"]) is WorkerUnresponsive
            assert "was not acked within 0.5 s" in str(results["echo"])
            assert results["echo"].started is False  # never acked: it never ran
            assert type(results["hang"]) is WorkerUnresponsive
            assert results["hang"].started is True
            assert worker.state is WorkerState.FAILED
            assert_reaped(worker)


async def test_stopped_worker_is_detected_by_missed_heartbeats() -> None:
    interval, missed = 0.2, 2
    errors: list[BaseException] = []
    with trio.fail_after(20):
        async with open_worker(
            diagnostics=True, heartbeat_interval=interval, heartbeat_missed=missed
        ) as worker:
            pid = worker.pid
            try:

                async def one() -> None:
                    try:
                        await worker.call("sleep", {"seconds": 30})
                    except DspexError as exc:
                        errors.append(exc)

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(one)
                    await wait_executing(worker, 3)
                    os.kill(pid, signal.SIGSTOP)
                    stopped_at = trio.current_time()
                detected = trio.current_time() - stopped_at
            finally:
                if worker.exit_status is None:  # not reaped yet: the pid is still ours to signal
                    kill_quietly(pid, signal.SIGCONT)
                    kill_quietly(pid, signal.SIGKILL)
            assert detected < interval * (missed + 1) + 1.0
            assert len(errors) == 3
            for exc in errors:
                assert type(exc) is WorkerUnresponsive
                assert "no answer to heartbeats" in str(exc)
                assert exc.started is True
            assert worker.state is WorkerState.FAILED
            assert_reaped(worker)


# -- 5. the teardown ladder reaches SIGKILL ---------------------------------------------------------


async def test_worker_ignoring_sigterm_and_shutdown_is_sigkilled_after_the_grace() -> None:
    hang_error: list[BaseException] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with open_worker(
                diagnostics=True, shutdown_grace=0.3, term_grace=0.3, heartbeat_interval=10
            ) as worker:
                assert await worker.call("ignore_signal", {"signal": "SIGTERM"}) == "SIGTERM"

                async def hang() -> None:
                    try:
                        await worker.call("hang")
                    except DspexError as exc:
                        hang_error.append(exc)

                nursery.start_soon(hang)
                # its frame goes out before the shutdown frame, so the reader is stuck before the shutdown
                await wait_until(lambda: worker.in_flight == 1, 5.0)
                start = trio.current_time()
            elapsed = trio.current_time() - start
        assert 0.6 <= elapsed < 3.0
        assert worker.exit_status == ExitStatus(code=None, signal=signal.SIGKILL)
        assert worker.state is WorkerState.FAILED
        assert_reaped(worker)
        assert len(hang_error) == 1
        assert type(hang_error[0]) is WorkerClosed
        assert "SIGKILL" in str(hang_error[0])


# -- 6, 7. stray output ------------------------------------------------------------------------------


async def test_stdout_spew_does_not_disturb_the_frame_stream(worker: Worker) -> None:
    big = "y" * 300_000  # frames that span several reads while the noise flows

    async def echoes(tag: str, n: int) -> None:
        for i in range(n):
            value = {"tag": tag, "i": i, "big": big if i % 5 == 0 else ""}
            assert await worker.call("echo", {"value": value}) == value

    with trio.fail_after(30):
        await echoes("before", 10)
        spewed: list[int] = []

        async def spew() -> None:
            spewed.append(await worker.call("spew_stdout", {"bytes": 5_000_000}))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(spew)
            for k in range(4):
                nursery.start_soon(echoes, f"during-{k}", 50)
        await echoes("after", 10)
    assert spewed == [5_000_000]
    assert worker.state is WorkerState.READY
    assert worker.statistics().calls_failed == 0
    # the spew went to the worker's stderr (fd 1 points there), not onto the frame stream
    await wait_until(lambda: worker.stderr_tail and set(worker.stderr_tail[-1]) == {"x"}, 5.0)


async def test_stderr_flood_does_not_stall_calls(worker: Worker) -> None:
    total = 10_000_000
    line = "e" * 99  # spew_stderr writes lines of 99 "e" and a newline
    with captured_worker_stderr() as logged, trio.fail_after(30):
        flood_done = trio.Event()
        flood_result: list[int] = []
        echoes_done_during_flood = 0
        echoes_done = 0

        async def flood() -> None:
            flood_result.append(await worker.call("spew_stderr", {"bytes": total}))
            flood_done.set()

        async def echoes(k: int) -> None:
            nonlocal echoes_done, echoes_done_during_flood
            for i in range(10):
                value = [k, i]
                assert await worker.call("echo", {"value": value}) == value
                echoes_done += 1
                echoes_done_during_flood += not flood_done.is_set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await wait_until(lambda: len(logged.lines) > 0, 5.0, "the flood never started")
            async with trio.open_nursery() as callers:
                for k in range(20):
                    callers.start_soon(echoes, k)
    assert echoes_done == 200
    assert echoes_done_during_flood > 0, "no call completed while the flood ran"
    assert flood_result == [total]
    # every line was read and re-logged, none lost or merged (the handle's stderr reader kept up)
    await wait_until(lambda: len(logged.lines) >= total // 100, 5.0)
    assert len(logged.lines) == total // 100
    assert all(text.endswith(line) for text in logged.lines)
    assert worker.state is WorkerState.READY


# -- 8. a corrupt frame ------------------------------------------------------------------------------


async def test_corrupt_frame_fails_pending_calls_with_protocol_error() -> None:
    errors: list[BaseException] = []
    with trio.fail_after(20):
        async with open_worker(diagnostics=True) as worker:

            async def one(method: str, params: Any) -> None:
                try:
                    await worker.call(method, params)
                except DspexError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one, "sleep", {"seconds": 30})
                await wait_executing(worker, 4)
                nursery.start_soon(one, "garbage", {"bytes": 100})
            assert len(errors) == 5
            for exc in errors:
                assert type(exc) is ProtocolError
                assert "protocol error" in str(exc)
            assert worker.state is WorkerState.FAILED
            assert_reaped(worker)


# -- 9. orphan safety --------------------------------------------------------------------------------

PARENT_SCRIPT = """
import sys
import trio
import dspex_trio

async def main():
    async with dspex_trio.open_worker(diagnostics=True) as worker:
        grandchild = 0
        if sys.argv[1] == "spawn":
            grandchild = await worker.call("spawn_child", {"seconds": 60})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.call, "sleep", {"seconds": 60})
            while not (await worker.call("stats"))["executing"]:
                await trio.sleep(0.01)
            print(worker.pid, grandchild, flush=True)
            await trio.sleep_forever()

trio.run(main)
"""


@pytest.mark.parametrize("variant", ["plain", "spawn"])
async def test_worker_dies_within_a_second_of_its_parent_being_sigkilled(variant: str) -> None:
    parent = await trio.lowlevel.open_process(
        [sys.executable, "-c", PARENT_SCRIPT, variant],
        stdout=subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )
    assert parent.stdout is not None
    pids: list[int] = []
    gone = False
    try:
        with trio.fail_after(30):
            data = b""
            while not data.endswith(b"\n"):
                chunk = await parent.stdout.receive_some()
                assert chunk, f"the parent script exited early ({await parent.wait()})"
                data += chunk
            worker_pid, grandchild_pid = map(int, data.split())
            pids = [worker_pid] + ([grandchild_pid] if variant == "spawn" else [])
            assert all(pid_alive(pid) for pid in pids)
            os.kill(parent.pid, signal.SIGKILL)
            # not our children: init reaps them (or not), so a zombie counts as gone
            await wait_until(
                lambda: not any(pid_alive(pid) for pid in pids),
                1.0,
                lambda: f"still alive after the parent's death: {[(p, process_state(p)) for p in pids]}",
            )
            gone = True
            assert await parent.wait() == -signal.SIGKILL
    finally:
        if parent.returncode is None:  # not reaped: the pid is still ours
            kill_quietly(parent.pid)
        if not gone:  # a leftover worker or grandchild (pids that were alive a moment ago)
            for pid in pids:
                if pid_alive(pid):
                    kill_quietly(pid)
        with trio.CancelScope(shield=True):
            await parent.wait()
            await parent.stdout.aclose()


# -- 10. no leaks ------------------------------------------------------------------------------------


async def test_a_hundred_start_stop_cycles_leak_no_fd_and_no_process() -> None:
    async def cycle(i: int) -> None:
        if i % 10 == 7:  # start-up failure
            with pytest.raises(WorkerStartFailed):
                async with open_worker(
                    diagnostics=True, launcher=SubprocessLauncher(extra_args=["--fail-at-start", "3"])
                ):
                    pass  # pragma: no cover
            return
        async with open_worker(diagnostics=True) as worker:
            assert await worker.call("echo", {"value": i}) == i
            if i % 10 == 3:  # the worker dies under us
                os.kill(worker.pid, signal.SIGKILL)
                await wait_until(lambda: worker.state is WorkerState.FAILED, 30.0)
        assert worker.exit_status is not None

    # What this proves is the absence of leaks, not speed: ~10 s on a quiet machine, several times
    # that on a loaded 2-core one (ten of the cycles start a cold subprocess), so the bound is generous.
    with trio.fail_after(240):
        await cycle(0)  # warm-up: anything opened lazily once is not a leak
        fds_before = open_fds()
        for i in range(100):
            await cycle(i)
    fds_after = open_fds()
    leaked = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    assert len(fds_after) <= len(fds_before), f"leaked fds: {leaked}"
    assert child_processes() == {}


# -- 11. typed errors --------------------------------------------------------------------------------


async def test_unknown_method_is_unknown_method(worker: Worker) -> None:
    with pytest.raises(UnknownMethod, match="no_such_method"):
        await worker.call("no_such_method")
    assert await worker.call("echo", {"value": 1}) == 1


async def test_diagnostic_methods_do_not_exist_without_diagnostics() -> None:
    async with open_worker() as worker:
        with pytest.raises(UnknownMethod, match="echo"):
            await worker.call("echo", {"value": 1})
        assert "echo" not in worker.hello.capabilities  # type: ignore[union-attr]
        assert (await worker.call("ping"))["pid"] == worker.pid
        assert worker.state is WorkerState.READY


async def test_unencodable_result_is_invalid_params(worker: Worker) -> None:
    with pytest.raises(InvalidParams):
        await worker.call("unencodable")
    assert await worker.call("echo", {"value": "after"}) == "after"


@pytest.mark.parametrize(
    "bad", [object(), 1 + 2j, {"nested": [object()]}], ids=["object", "complex", "nested"]
)
async def test_unencodable_params_are_invalid_params_and_nothing_is_sent(worker: Worker, bad: Any) -> None:
    calls_before = (await stats(worker))["calls"]
    with pytest.raises(InvalidParams, match="echo"):
        await worker.call("echo", {"value": bad})
    assert worker.in_flight == 0
    assert await worker.call("echo", {"value": "after"}) == "after"
    assert (await stats(worker))["calls"] == calls_before + 2  # the echo after, and the first stats


async def test_sets_are_carried_as_arrays(worker: Worker) -> None:
    # not an encoding error: the codec carries sets and tuples as arrays (see tests/bridge_child)
    assert sorted(await worker.call("echo", {"value": {3, 1, 2}})) == [1, 2, 3]


async def test_exception_in_the_worker_is_worker_error_naming_its_type(worker: Worker) -> None:
    with pytest.raises(WorkerError) as info:
        await worker.call("raise", {"message": "boom"})
    assert info.value.error_type == "RuntimeError"
    assert str(info.value) == "RuntimeError: boom"
    assert worker.state is WorkerState.READY
    assert await worker.call("echo", {"value": 1}) == 1


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        ("invalid_params", InvalidParams),
        ("unencodable", InvalidParams),
        ("program_not_found", ProgramNotFound),
        ("program_error", ProgramError),
        ("timeout", CallTimeout),
        ("internal", WorkerError),
    ],
)
async def test_error_codes_map_to_typed_errors(worker: Worker, code: str, error_type: type) -> None:
    with pytest.raises(error_type) as info:
        await worker.call("fail", {"code": code, "message": f"failed with {code}", "type": "ValueError"})
    assert type(info.value) is error_type
    assert f"failed with {code}" in str(info.value)


@contextmanager
def no_core_dumps() -> Iterator[None]:
    """Children started meanwhile inherit a zero core-file limit (a SIGSEGV test leaves no core file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


@pytest.mark.parametrize(
    ("params", "named", "expected_status"),
    [
        ({"exit_code": 7}, "exit code 7", ExitStatus(code=7, signal=None)),
        ({"signal": "SIGSEGV"}, "SIGSEGV", ExitStatus(code=None, signal=signal.SIGSEGV)),
    ],
    ids=["exit-code", "segfault"],
)
async def test_crash_is_worker_crashed_naming_how(
    params: dict[str, Any], named: str, expected_status: ExitStatus
) -> None:
    with no_core_dumps(), trio.fail_after(20):
        async with open_worker(diagnostics=True) as worker:
            with pytest.raises(WorkerCrashed) as info:
                await worker.call("crash", params)
            assert type(info.value) is WorkerCrashed
            assert named in str(info.value)
            assert info.value.exit_status == expected_status
            assert info.value.started is True
            assert worker.state is WorkerState.FAILED
        assert worker.exit_status == expected_status
        assert worker.pid not in child_processes()


async def test_failure_at_start_is_worker_start_failed_not_a_group() -> None:
    launcher = SubprocessLauncher(extra_args=["--fail-at-start", "5"])
    with trio.fail_after(20):
        with pytest.raises(WorkerStartFailed) as info:
            async with open_worker(diagnostics=True, launcher=launcher):
                pytest.fail("open_worker returned a worker that failed at start")  # pragma: no cover
    assert type(info.value) is WorkerStartFailed  # the exception itself, not an ExceptionGroup
    assert "exit code 5" in str(info.value)
    assert "failing at start with exit code 5" in str(info.value)  # its stderr is quoted
    assert info.value.exit_status == ExitStatus(code=5, signal=None)
    assert info.value.started is False
    assert child_processes() == {}


# -- 12. late replies --------------------------------------------------------------------------------


async def test_late_replies_never_reach_another_caller(worker: Worker) -> None:
    rng = random.Random(12)
    n_tasks, sleeps_per_task, echoes_per_task = 40, 50, 50  # 2,000 sleeps, 2,000 echoes
    timeouts = 0
    sleeps_ok = 0

    async def task(k: int) -> None:
        nonlocal timeouts, sleeps_ok
        plan = ["sleep"] * sleeps_per_task + ["echo"] * echoes_per_task
        random.Random(k).shuffle(plan)
        for i, kind in enumerate(plan):
            if kind == "echo":
                value = f"task{k}-call{i}"
                assert await worker.call("echo", {"value": value}) == value
            else:
                seconds = rng.uniform(0, 0.02)
                try:
                    result = await worker.call(
                        "sleep", {"seconds": seconds}, timeout=rng.uniform(0.005, 0.015)
                    )
                except CallTimeout:
                    timeouts += 1
                else:
                    assert result == seconds
                    sleeps_ok += 1

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for k in range(n_tasks):
                nursery.start_soon(task, k)
        assert timeouts + sleeps_ok == n_tasks * sleeps_per_task
        assert timeouts > 0
        assert worker.in_flight == 0
        last: dict[str, Any] = {}

        async def idle() -> bool:
            last.update(await stats(worker))
            return last["executing"] == [] and last["pending"] == []

        await wait_until(idle, 5.0, lambda: f"the worker is still busy: {last}")
    assert worker.statistics().calls_failed == timeouts
    assert worker.state is WorkerState.READY


# -- 13. streaming -----------------------------------------------------------------------------------


async def test_stream_yields_events_in_order_then_the_result(worker: Worker) -> None:
    with trio.fail_after(10):
        async with worker.stream("sleep", {"seconds": 0.2, "ticks": 4}) as s:
            events = [event async for event in s]
            assert await s.result() == 0.2
    assert events == [{"tick": 0}, {"tick": 1}, {"tick": 2}, {"tick": 3}]
    assert worker.in_flight == 0


async def test_leaving_a_stream_early_cancels_the_call_in_the_worker(worker: Worker) -> None:
    with trio.fail_after(15):
        before = await stats(worker)
        async with worker.stream("sleep", {"seconds": 30, "ticks": 300}) as s:
            first = await s.__anext__()
            (call_id,) = (await stats(worker))["executing"]
        assert first == {"tick": 0}
        assert worker.in_flight == 0
        await wait_stopped_in_worker(worker, [call_id], before["cancelled"] + 1)
        assert await worker.call("echo", {"value": 1}) == 1


# -- 14. shutdown with calls in flight --------------------------------------------------------------


async def test_exit_lets_calls_finish_within_the_grace() -> None:
    results: list[Any] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with open_worker(diagnostics=True, shutdown_grace=5.0) as worker:

                async def one() -> None:
                    results.append(await worker.call("sleep", {"seconds": 0.3}))

                for _ in range(5):
                    nursery.start_soon(one)
                await wait_executing(worker, 5)
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert results == [0.3] * 5
    assert elapsed < 3.0
    assert worker.state is WorkerState.STOPPED
    assert_reaped(worker, None)


async def test_exit_with_a_call_longer_than_the_grace_is_bounded() -> None:
    grace = 0.3
    outcomes: dict[str, Any] = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with open_worker(diagnostics=True, shutdown_grace=grace) as worker:

                async def one(name: str, seconds: float) -> None:
                    try:
                        outcomes[name] = await worker.call("sleep", {"seconds": seconds})
                    except DspexError as exc:
                        outcomes[name] = exc

                nursery.start_soon(one, "short", 0.05)
                nursery.start_soon(one, "long", 30)
                await wait_executing(worker, 2)
                start = trio.current_time()
            elapsed = trio.current_time() - start
    assert grace - 0.05 <= elapsed < grace + 2.5
    assert outcomes["short"] == 0.05
    long = outcomes["long"]
    assert type(long) is WorkerClosed
    assert "shut down (exit code 0) with call" in str(long)
    assert worker.state is WorkerState.STOPPED
    assert_reaped(worker, None)
    with pytest.raises(WorkerClosed):
        await worker.call("echo", {"value": 1})
