"""A lone call's caller reads its reply from the frame pipe itself (``Worker._read_nowait``).

When a call is the only one in flight, its caller reads the frame pipe right after writing its frame:
a worker that already answered (one CPU: the worker runs inside the caller's ``os.write``) is answered
with one checkpoint, not a wake-up of the reader task that then reschedules the caller. These tests
drive a worker handle over real pipes (``os.pipe``) to an in-process "child" task, so which side reads
what is decided by the test: bytes written to the frame pipe just before ``call()`` (with no checkpoint
in between, so the reader task cannot run) can only be read by the caller.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from bridge_child import wire
from dspex_trio import ExitStatus, ProtocolError, Worker, WorkerState, open_worker
from dspex_trio._launcher import WorkerSpec

_pids = itertools.count(60_000_000)  # far above any real pid: never signalled


@attrs.define(eq=False)
class PipeProcess:
    """A worker "process" whose frame pipes are real pipes and whose child is a task of the test.

    The child says hello, then reads calls; while ``answering`` it acks and answers ``echo``, else it
    only reads (the test writes the replies itself, with :meth:`write_frames`)."""

    pid: int
    stdin: trio.lowlevel.FdStream
    frames: trio.lowlevel.FdStream
    stderr: trio.testing.MemoryReceiveStream
    child_in: trio.lowlevel.FdStream
    child_out_fd: int
    child_err: trio.testing.MemorySendStream
    answering: bool = True
    calls: list[wire.Call] = attrs.Factory(list)
    cancels: int = 0
    signals: list[int] = attrs.Factory(list)
    _status: ExitStatus | None = None
    _exited: trio.Event = attrs.Factory(trio.Event)
    _conn: wire.Connection = attrs.Factory(lambda: wire.Connection(wire.Role.CHILD))

    def exit_status(self) -> ExitStatus | None:
        return self._status

    async def wait(self) -> ExitStatus:
        await self._exited.wait()
        assert self._status is not None
        return self._status

    def signal_group(self, signum: int) -> None:
        self.signals.append(signum)
        if signum in (signal.SIGKILL, signal.SIGTERM):
            self.die(signal=signum)

    async def aclose(self) -> None:
        for stream in (self.stdin, self.frames, self.stderr):
            await stream.aclose()

    def die(self, code: int | None = None, *, signal: int | None = None) -> None:
        if self._exited.is_set():
            return
        self._status = ExitStatus(code=code if signal is None else None, signal=signal)
        os.close(self.child_out_fd)  # the frame pipe reaches EOF
        self.child_err.close()
        self._exited.set()

    def write_frames(self, *messages: wire.ChildMessage, raw: bytes = b"") -> None:
        """Put frames on the frame pipe now (no state checks: the test plays the worker's part)."""
        data = b"".join(wire.encode_frame(m) for m in messages) + raw
        assert os.write(self.child_out_fd, data) == len(data)

    async def run(self) -> None:
        self.write_frames(raw=self._conn.send(wire.Hello(wire.PROTOCOL_VERSION, self.pid, 4, ["echo"])))
        while not self._exited.is_set():
            try:
                data = await self.child_in.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.die(0)
                return
            self._conn.receive_data(data)
            while (message := self._conn.next_event()) is not wire.NEED_DATA:
                if isinstance(message, wire.Shutdown):
                    self.die(0)
                    return
                if isinstance(message, wire.Cancel):
                    self.cancels += 1
                elif isinstance(message, wire.Call):
                    self.calls.append(message)
                    if self.answering:
                        self.write_frames(
                            wire.Ack(message.id), wire.Result(message.id, message.params["value"])
                        )


@attrs.define(eq=False)
class PipeLauncher:
    nursery: trio.Nursery
    name: str = "pipe-test"
    processes: list[PipeProcess] = attrs.Factory(list)

    async def launch(self, spec: WorkerSpec) -> PipeProcess:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        child_err, stderr = trio.testing.memory_stream_one_way_pair()
        process = PipeProcess(
            next(_pids),
            trio.lowlevel.FdStream(in_w),
            trio.lowlevel.FdStream(out_r),
            stderr,
            trio.lowlevel.FdStream(in_r),
            out_w,
            child_err,
        )
        self.processes.append(process)
        self.nursery.start_soon(process.run)
        return process


@asynccontextmanager
async def pipe_worker() -> AsyncIterator[tuple[Worker, PipeProcess]]:
    async with trio.open_nursery() as nursery:
        launcher = PipeLauncher(nursery)
        async with open_worker(launcher=launcher, heartbeat_interval=60.0, shutdown_grace=1.0) as worker:
            yield worker, launcher.processes[0]
        for process in launcher.processes:
            process.die(signal=signal.SIGKILL)
            await process.child_in.aclose()


async def test_a_reply_already_in_the_pipe_is_delivered_by_the_lone_caller() -> None:
    with trio.fail_after(10):
        async with pipe_worker() as (worker, process):
            assert await worker.call("echo", {"value": 1}) == 1  # call 1: answered by the child
            process.answering = False
            # Call 2's ack and result, in the pipe before the call is made: with no checkpoint between
            # this write and the caller's read, only the caller can read them (for the reader task they
            # would be frames of a call not sent yet: a protocol error).
            process.write_frames(wire.Ack(2), wire.Result(2, "already there"))
            assert await worker.call("echo", {"value": 2}) == "already there"
            assert worker.state is WorkerState.READY
            assert worker.statistics().calls_served == 2
            await trio.testing.wait_all_tasks_blocked()  # the child has read call 2 (unanswered)
            assert len(process.calls) == 2
            process.answering = True
            assert await worker.call("echo", {"value": 3}) == 3  # and the reader still delivers
            assert [c.id for c in process.calls] == [1, 2, 3]


async def test_read_nowait_delivers_what_the_pipe_holds_without_a_checkpoint() -> None:
    with trio.fail_after(10):
        async with pipe_worker() as (worker, process):
            process.answering = False
            call = worker._submit("echo", {"value": 1}, timeout=None, flags=0)
            worker._read_nowait()  # nothing there yet: nothing happens
            assert not call.done.is_set()
            process.write_frames(wire.Ack(call.id), wire.Result(call.id, "read by the caller"))
            worker._read_nowait()  # synchronous: no other task ran in between
            assert call.done.is_set() and call.acked
            assert call.result is not None and call.result.unwrap() == "read by the caller"
            assert worker.in_flight == 0


async def test_ack_alone_in_the_pipe_then_the_result_through_the_reader() -> None:
    with trio.fail_after(10):
        async with pipe_worker() as (worker, process):
            process.answering = False
            process.write_frames(wire.Ack(1))  # the caller reads the ack; the result comes later

            async def answer_later() -> None:
                await trio.testing.wait_all_tasks_blocked()
                process.write_frames(wire.Result(1, "later"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_later)
                assert await worker.call("echo", {"value": 1}) == "later"
            assert worker.state is WorkerState.READY


async def test_garbage_read_by_the_caller_is_a_protocol_error() -> None:
    with trio.fail_after(10):
        async with pipe_worker() as (worker, process):
            process.answering = False
            process.write_frames(raw=b"\x00" * 16)  # bad magic
            with pytest.raises(ProtocolError, match="protocol error"):
                await worker.call("echo", {"value": 1})
            assert worker.state is WorkerState.FAILED
            assert signal.SIGKILL in process.signals


async def test_a_cancelled_caller_whose_reply_is_there_gets_cancelled_and_nothing_leaks() -> None:
    with trio.fail_after(10):
        async with pipe_worker() as (worker, process):
            process.answering = False
            process.write_frames(wire.Ack(1), wire.Result(1, "done"))
            with trio.CancelScope() as scope:
                scope.cancel()
                await worker.call("echo", {"value": 1})  # done at once, but a checkpoint: Cancelled
            assert scope.cancelled_caught
            assert worker.in_flight == 0
            assert worker.state is WorkerState.READY
            await trio.testing.wait_all_tasks_blocked()  # the child has read call 1 (unanswered)
            assert len(process.calls) == 1
            process.answering = True
            assert await worker.call("echo", {"value": 2}) == 2
            assert process.cancels == 0  # it had finished: nothing to cancel in the worker


async def test_with_two_calls_in_flight_only_the_reader_reads() -> None:
    with trio.fail_after(10):
        async with pipe_worker() as (worker, process):
            process.answering = False
            results: dict[int, object] = {}

            async def call(value: int) -> None:
                results[value] = await worker.call("echo", {"value": value})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, 1)
                await trio.testing.wait_all_tasks_blocked()
                assert worker.in_flight == 1
                # Call 2 is not alone: its caller does not read, so call 1's reply written before it
                # is the reader's (and then call 2's, in the same order).
                process.write_frames(wire.Ack(1), wire.Result(1, "one"))
                nursery.start_soon(call, 2)
                await trio.testing.wait_all_tasks_blocked()
                process.write_frames(wire.Ack(2), wire.Result(2, "two"))
            assert results == {1: "one", 2: "two"}
