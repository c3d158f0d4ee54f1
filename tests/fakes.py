"""In-memory fake workers for timer tests: a ``Launcher`` whose processes are Trio tasks.

A :class:`FakeProcess` has the three pipes of a real worker as in-memory streams; its "child" is a task
speaking ``bridge_child.wire``'s ``Connection(Role.CHILD)``: it sends ``hello``, acks calls, answers
pings, and serves a few methods (``ping``, ``echo``, ``sleep``, ``hang``, ``validate_lm``,
``configure_lm``). A test steers it: :meth:`FakeProcess.go_silent` (stops answering anything, pings
included), :meth:`FakeProcess.die` (exits with a code), and launcher-wide ``fail_at_start`` (exits
before its hello), ``die_before_ack`` / ``die_after_ack`` (the next N calls kill their worker). Signals end it as a real process would (``SIGKILL`` / ``SIGTERM`` -> killed by that
signal); ``SIGSTOP`` freezes it. No real process is involved, so ``autojump_clock`` gives exact times.
"""

from __future__ import annotations

import itertools
import math
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from bridge_child import wire
from dspex_trio import ExitStatus
from dspex_trio._launcher import SubprocessLauncher, WorkerProcess, WorkerSpec

FAKE_PID_BASE = 50_000_000
"""Fake pids start here: far above any real pid (``pid_max`` is at most 2**22)."""
_pids = itertools.count(FAKE_PID_BASE)


@attrs.define(eq=False)
class FakeProcess:
    """A worker process that is a task; see the module doc."""

    spec: WorkerSpec
    pid: int
    stdin: trio.testing.MemorySendStream
    frames: trio.testing.MemoryReceiveStream
    stderr: trio.testing.MemoryReceiveStream
    _child_in: trio.testing.MemoryReceiveStream
    _child_out: trio.testing.MemorySendStream
    _child_err: trio.testing.MemorySendStream
    fail_at_start: int | None = None
    capacity: int = 4
    launcher: FakeLauncher | None = None
    silent: bool = False
    """True: reads frames but answers nothing (pings included), like a wedged reader."""
    stopped: bool = False
    """True after SIGSTOP: nothing is read or answered until SIGCONT."""
    signals: list[int] = attrs.Factory(list)
    pings: int = 0
    calls: list[str] = attrs.Factory(list)
    timeouts: list[float | None] = attrs.Factory(list)
    """Each call's ``timeout`` as it arrived (the seconds its caller gave it)."""
    cancels: int = 0
    """``cancel`` frames received."""
    _status: ExitStatus | None = None
    _exited: trio.Event = attrs.Factory(trio.Event)
    _resumed: trio.Event = attrs.Factory(trio.Event)
    _send_lock: trio.Lock = attrs.Factory(trio.Lock)
    _conn: wire.Connection = attrs.Factory(lambda: wire.Connection(wire.Role.CHILD))
    _cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    # -- the WorkerProcess protocol -------------------------------------------------------------------
    def exit_status(self) -> ExitStatus | None:
        return self._status

    async def wait(self) -> ExitStatus:
        await self._exited.wait()
        assert self._status is not None
        return self._status

    def signal_group(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGSTOP:
            self.stopped = True
            self._resumed = trio.Event()
        elif signum == signal.SIGCONT:
            self.stopped = False
            self._resumed.set()
        elif signum in (signal.SIGKILL, signal.SIGTERM):
            self.die(signal=signum)

    async def aclose(self) -> None:
        for stream in (self.stdin, self.frames, self.stderr):
            await stream.aclose()

    # -- test controls ----------------------------------------------------------------------------------
    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    def go_silent(self) -> None:
        self.silent = True

    def die(self, code: int | None = None, *, signal: int | None = None) -> None:
        """Exit now with ``code`` (or killed by ``signal``): the pipes close, ``wait()`` returns."""
        if self._exited.is_set():
            return
        self._status = ExitStatus(code=code if signal is None else None, signal=signal)
        self._cancel_scope.cancel()
        self._child_out.close()
        self._child_err.close()
        self._exited.set()

    # -- the child ------------------------------------------------------------------------------------
    async def _send(self, message: wire.ChildMessage) -> None:
        data = self._conn.send(message)
        async with self._send_lock:
            try:
                await self._child_out.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def run(self) -> None:
        with self._cancel_scope:
            await trio.lowlevel.checkpoint()
            if self.fail_at_start is not None:
                await self._child_err.send_all(b"fake worker: failing at start\n")
                self.die(self.fail_at_start)
                return
            await self._send(wire.Hello(wire.PROTOCOL_VERSION, self.pid, self.capacity, ["ping", "echo"]))
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        data = bytes(await self._child_in.receive_some(65536))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    while self.stopped:
                        await self._resumed.wait()
                    if not data:  # stdin EOF: exit at once, like bridge_child
                        self.die(0)
                        return
                    self._conn.receive_data(data)
                    while (message := self._conn.next_event()) is not wire.NEED_DATA:
                        if self.silent:
                            continue
                        await self._handle(message, nursery)  # type: ignore[arg-type]

    async def _handle(self, message: wire.ParentMessage, nursery: trio.Nursery) -> None:
        if isinstance(message, wire.Ping):
            self.pings += 1
            await self._send(wire.Pong(message.nonce))
        elif isinstance(message, wire.Shutdown):
            self.die(0)
        elif isinstance(message, wire.Cancel):
            self.cancels += 1
            if self._conn.call_state(message.id) is not wire.CallState.DONE:
                await self._send(wire.Error(message.id, wire.ErrorCode.CANCELLED, "Cancelled", "cancelled"))
        elif isinstance(message, wire.Call):
            self.calls.append(message.method)
            self.timeouts.append(message.timeout)
            if self.launcher is not None and self.launcher.die_before_ack > 0:
                self.launcher.die_before_ack -= 1
                self.die(1)
                return
            await self._send(wire.Ack(message.id))
            if self.launcher is not None and self.launcher.die_after_ack > 0:
                self.launcher.die_after_ack -= 1
                self.die(1)
                return
            nursery.start_soon(self._run_call, message)

    async def _run_call(self, call: wire.Call) -> None:
        params = call.params if isinstance(call.params, dict) else {}
        if call.method == "ping":
            value: Any = {"pid": self.pid, "worker_id": self.spec.worker_id}
        elif call.method == "echo":
            value = params.get("value")
        elif call.method == "sleep":
            await trio.sleep(params.get("seconds", 0))
            value = params.get("seconds", 0)
        elif call.method == "hang":
            await trio.sleep(math.inf)
        elif call.method in ("validate_lm", "configure_lm"):
            value = {"model": "offline"}
        else:
            if self._conn.call_state(call.id) is wire.CallState.RUNNING:
                await self._send(wire.Error(call.id, wire.ErrorCode.UNKNOWN_METHOD, "", call.method))
            return
        if self._conn.call_state(call.id) is wire.CallState.RUNNING and not self.silent:
            await self._send(wire.Result(call.id, value))


@attrs.define(eq=False)
class FakeLauncher:
    """A ``Launcher`` of :class:`FakeProcess` children, run in the launcher's own nursery."""

    nursery: trio.Nursery
    name: str = "fake"
    fail_at_start: int | None = None
    """While set, every new worker exits with this code before its hello."""
    capacity: int = 4
    die_before_ack: int = 0
    """The next this many calls (on any worker) make their worker exit (code 1) before acking them."""
    die_after_ack: int = 0
    """The next this many calls make their worker exit (code 1) right after acking them."""
    processes: list[FakeProcess] = attrs.Factory(list)

    async def launch(self, spec: WorkerSpec) -> FakeProcess:
        to_child, child_in = trio.testing.memory_stream_one_way_pair()
        child_out, frames = trio.testing.memory_stream_one_way_pair()
        child_err, stderr = trio.testing.memory_stream_one_way_pair()
        process = FakeProcess(
            spec,
            next(_pids),
            to_child,
            frames,
            stderr,
            child_in,
            child_out,
            child_err,
            fail_at_start=self.fail_at_start,
            capacity=self.capacity,
            launcher=self,
        )
        self.processes.append(process)
        self.nursery.start_soon(process.run)
        return process

    @property
    def live(self) -> list[FakeProcess]:
        return [p for p in self.processes if not p.exited]


@asynccontextmanager
async def open_fake_launcher(**kwargs: Any) -> AsyncIterator[FakeLauncher]:
    """A :class:`FakeLauncher`; leaving the block kills whatever fake process is left."""
    async with trio.open_nursery() as nursery:
        launcher = FakeLauncher(nursery, **kwargs)
        try:
            yield launcher
        finally:
            for process in launcher.processes:
                process.die(signal=signal.SIGKILL)


@attrs.define
class FlakyLauncher:
    """Wraps the real subprocess launcher: while ``failing``, workers exit with code 3 before their hello."""

    inner: SubprocessLauncher = attrs.Factory(SubprocessLauncher)
    failing: bool = True
    name: str = "flaky-subprocess"
    launched: int = 0

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        self.launched += 1
        if self.failing:
            spec = attrs.evolve(spec, diagnostics=True, fail_at_start=3)
        return await self.inner.launch(spec)
