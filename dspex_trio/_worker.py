"""The worker handle: one ``bridge_child`` process, owned by a nursery, many calls multiplexed by id.

Tasks (all in the worker's own nursery): a reader routes frames to their calls, a writer coalesces
queued frames into few writes, a stderr reader re-logs the worker's output with its id, a watcher
waits for the process to exit and fails what is left, and a heartbeat pings it. Detectors (protocol
error, missed heartbeats, missing ack, EOF) only record a cause and kill the process; the watcher then
fails every pending call once, with the cause's error and the exit code or signal.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import outcome
import trio

from bridge_child import wire
from dspex_trio._errors import (
    CallTimeout,
    DspexError,
    ExitStatus,
    InvalidParams,
    Overloaded,
    ProtocolError,
    WorkerClosed,
    WorkerCrashed,
    WorkerStartFailed,
    WorkerUnresponsive,
    error_from_frame,
)
from dspex_trio._launcher import DEFAULT_CAPACITY, Launcher, SubprocessLauncher, WorkerProcess, WorkerSpec
from dspex_trio._states import ACCEPTING, TERMINAL, WorkerState, check_transition
from dspex_trio._util import open_service_nursery

logger = logging.getLogger("dspex_trio.worker")

READ_CHUNK_BYTES: Final = 256 * 1024
"""Most bytes taken from a worker's frame or stderr pipe per read."""
STDERR_READ_CHUNK_BYTES: Final = 32 * 1024
"""Most stderr bytes handled per read, so re-logging a flood yields to other tasks often."""
STDERR_TAIL_LINES: Final = 20
"""Last stderr lines kept per worker, quoted in start-up failures."""
MAX_STDERR_LINE_BYTES: Final = 8 * 1024
"""A longer stderr line is logged in pieces of this size, in bytes."""
READER_DRAIN_AFTER_EXIT_S: Final = 0.5
"""After the process exits, how long the reader may still drain frames already in the pipe, in seconds."""
EOF_EXIT_GRACE_S: Final = 1.0
"""A worker that closed its frame stream but is still alive after this many seconds is killed."""
KILL_REAP_TIMEOUT_S: Final = 5.0
"""How long to wait for a SIGKILLed worker to be reaped before giving up on it (and logging), in seconds."""
SEND_NOW_TIMEOUT_S: Final = 1.0
"""Longest wait to write the shutdown frame during the teardown ladder, in seconds."""
SHUTDOWN_SLACK_S: Final = 0.5
"""Added to the shutdown grace for the worker's own exit after its drain, in seconds."""

_worker_ids = itertools.count(1)


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen(kw_only=True)
class WorkerOptions:
    """Timeouts and limits of one worker handle. Every duration is in seconds."""

    capacity: int = attrs.field(default=DEFAULT_CAPACITY, validator=_positive)
    """Calls the worker runs at once (threads in the worker)."""
    start_timeout: float = attrs.field(default=30.0, validator=_positive)
    """From launch to the worker's ``hello``."""
    ack_timeout: float = attrs.field(default=5.0, validator=_positive)
    """From sending a call to its ack; past it the worker is wedged: killed and replaced."""
    heartbeat_interval: float = attrs.field(default=1.0, validator=_positive)
    """A ping every this many seconds."""
    heartbeat_missed: int = attrs.field(default=3, validator=_positive)
    """Silent for ``interval x missed`` seconds: unresponsive, killed (detected within ``x (missed + 1)``)."""
    shutdown_grace: float = attrs.field(default=5.0, validator=_non_negative)
    """On close: how long running calls may finish after the ``shutdown`` frame."""
    term_grace: float = attrs.field(default=2.0, validator=_non_negative)
    """On close: from SIGTERM to SIGKILL."""
    max_pending_calls: int = attrs.field(default=10_000, validator=_positive)
    """Calls in flight on one handle (past the worker's capacity they queue in the worker)."""
    max_stream_events: int = attrs.field(default=1024, validator=_positive)
    """Events buffered for one streamed call whose consumer lags; past it the call fails."""
    max_frame_bytes: int = attrs.field(default=wire.DEFAULT_MAX_FRAME_BYTES, validator=_positive)
    """Largest frame either way, in bytes."""

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> WorkerOptions:
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown worker option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)


@attrs.frozen
class WorkerStatistics:
    """A snapshot of one worker."""

    worker_id: str
    """The runtime's name for it (``w1``, ``w2``, ...)."""
    pid: int
    """Its process id."""
    state: WorkerState
    """Its state (see ``dspex_trio._states``)."""
    in_flight: int
    """Calls sent and not yet finished."""
    capacity: int
    """Calls it runs at once."""
    calls_served: int
    """Calls that ended with a result."""
    calls_failed: int
    """Calls that ended with an error (from the worker, a timeout, or its death)."""
    late_frames: int
    """Frames for abandoned (timed out or cancelled) calls, dropped."""
    restarts: int = 0
    """Times its pool slot replaced a worker (0 for a standalone worker)."""
    launcher: str = ""
    """Which launcher started it."""


TransitionCallback = Callable[["Worker", WorkerState, WorkerState, str], None]


@attrs.define(eq=False)
class _Call:
    id: int
    method: str
    sent_at: float
    timeout: float | None
    stream: bool
    acked: bool = False
    done: trio.Event = attrs.Factory(trio.Event)
    result: outcome.Outcome[Any] | None = None
    events: collections.deque[Any] | None = None
    """Stream events not yet consumed (streamed calls only)."""
    event_arrived: trio.Event | None = None

    def finish(self, result: outcome.Outcome[Any]) -> None:
        if self.done.is_set():
            return
        self.result = result
        self.done.set()
        if self.event_arrived is not None:
            self.event_arrived.set()


@attrs.define(eq=False)
class Worker:
    """A handle on one running worker process. Made by :func:`open_worker` (or a pool).

    ``call()`` may be used from many tasks at once; calls are multiplexed by id on one pipe.
    """

    worker_id: str
    process: WorkerProcess
    options: WorkerOptions
    launcher_name: str = ""
    on_transition: TransitionCallback | None = None
    hello: wire.Hello | None = None
    state: WorkerState = WorkerState.STARTING
    _conn: wire.Connection = attrs.field(init=False)
    _calls: dict[int, _Call] = attrs.Factory(dict)
    _unacked: dict[int, _Call] = attrs.Factory(dict)
    """Calls sent and not yet acked, oldest first."""
    _unacked_arrived: trio.Event = attrs.Factory(trio.Event)
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    _outbox: list[bytes] = attrs.Factory(list)
    _writer_wakeup: trio.Event = attrs.Factory(trio.Event)
    _send_lock: trio.Lock = attrs.Factory(trio.Lock)
    _idle: trio.Event = attrs.Factory(trio.Event)
    _stdin_fd: int | None = None
    """The raw, non-blocking fd behind ``process.stdin`` when it has one (direct writes)."""
    _hello_event: trio.Event = attrs.Factory(trio.Event)
    _reader_done: trio.Event = attrs.Factory(trio.Event)
    _exited: trio.Event = attrs.Factory(trio.Event)
    _torn_down: trio.Event = attrs.Factory(trio.Event)
    _exit_status: ExitStatus | None = None
    _cause: tuple[type[DspexError], str] | None = None
    _closing: bool = False
    _last_seen: float = 0.0
    _stderr_tail: collections.deque[str] = attrs.Factory(lambda: collections.deque(maxlen=STDERR_TAIL_LINES))
    _calls_served: int = 0
    _calls_failed: int = 0

    def __attrs_post_init__(self) -> None:
        fileno = getattr(self.process.stdin, "fileno", None)
        self._stdin_fd = fileno() if callable(fileno) else None
        self._conn = wire.Connection(wire.Role.PARENT, max_frame_bytes=self.options.max_frame_bytes)
        self._idle.set()

    # -- public ---------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def last_seen(self) -> float:
        """``trio.current_time()`` when the worker last sent anything."""
        return self._last_seen

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    @property
    def capacity(self) -> int:
        return self.hello.capacity if self.hello is not None else self.options.capacity

    @property
    def accepting(self) -> bool:
        """True while the worker takes new calls."""
        return self.state in ACCEPTING and not self._closing and self._cause is None

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._exit_status

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines the worker wrote to stderr."""
        return list(self._stderr_tail)

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            worker_id=self.worker_id,
            pid=self.pid,
            state=self.state,
            in_flight=len(self._calls),
            capacity=self.capacity,
            calls_served=self._calls_served,
            calls_failed=self._calls_failed,
            late_frames=self._conn.late_frames,
            launcher=self.launcher_name,
        )

    async def call(
        self, method: str, params: Any = None, *, timeout: float | None = None, idempotent: bool = False
    ) -> Any:
        """Run ``method(params)`` in the worker and return its result.

        Raises:
            CallTimeout: ``timeout`` seconds passed; the call was cancelled in the worker.
            WorkerCrashed: the worker died (``.started`` False if it never acked the call), or was killed
                as unresponsive (``WorkerUnresponsive``).
            ProtocolError: the worker broke the protocol; it was killed.
            UnknownMethod, InvalidParams, ProgramError, ...: the worker's answer.
            Overloaded: more than ``max_pending_calls`` calls in flight.
            WorkerClosed: the worker is closing or closed.
        Cancelling the caller cancels the call in the worker (a ``cancel`` frame), and its late reply, if
        any, is dropped.
        """
        flags = wire.FLAG_IDEMPOTENT if idempotent else 0
        call = self._submit(method, params, timeout=timeout, flags=flags)
        return await self._wait(call)

    @asynccontextmanager
    async def stream(
        self, method: str, params: Any = None, *, timeout: float | None = None
    ) -> AsyncIterator[CallStream]:
        """Run a streamed call: iterate its events, then read ``.result``.

        Leaving the block early cancels the call in the worker.
        """
        call = self._submit(method, params, timeout=timeout, flags=wire.FLAG_STREAM)
        stream = CallStream(self, call)
        try:
            yield stream
        finally:
            if not call.done.is_set():
                self._abandon(call)

    async def aclose(self, *, grace: float | None = None) -> None:
        """The teardown ladder: ``shutdown`` frame -> grace -> SIGTERM to the group -> grace -> SIGKILL
        -> reap. Shielded and bounded; safe to call more than once (later calls wait for the first).

        ``grace`` overrides ``options.shutdown_grace`` (a pool that already drained its calls passes 0).
        """
        shutdown_grace = self.options.shutdown_grace if grace is None else grace
        if self._closing:
            with trio.CancelScope(shield=True):
                await self._torn_down.wait()
            return
        self._closing = True
        with trio.CancelScope(shield=True):
            try:
                if self.state not in TERMINAL:
                    self._set_state(WorkerState.DRAINING, "closing")
                if not self._exited.is_set() and self.hello is not None and self._cause is None:
                    await self._send_now(wire.Shutdown(grace=shutdown_grace))
                    with trio.move_on_after(shutdown_grace + SHUTDOWN_SLACK_S):
                        await self._await_exit()
                if not self._exited.is_set():
                    logger.debug("worker %s: SIGTERM to its process group", self.worker_id)
                    self.process.signal_group(signal.SIGTERM)
                    with trio.move_on_after(self.options.term_grace):
                        await self._await_exit()
                if not self._exited.is_set():
                    logger.warning("worker %s (pid %d): SIGKILL after the grace", self.worker_id, self.pid)
                    self.process.signal_group(signal.SIGKILL)
                    with trio.move_on_after(KILL_REAP_TIMEOUT_S):
                        await self._await_exit()
                    if not self._exited.is_set():
                        logger.error("worker %s (pid %d) not reaped after SIGKILL", self.worker_id, self.pid)
                self.process.signal_group(signal.SIGKILL)  # grandchildren left in its group
                await self.process.aclose()
            finally:
                self._torn_down.set()

    # -- calls ----------------------------------------------------------------------------------------
    def _submit(self, method: str, params: Any, *, timeout: float | None, flags: int) -> _Call:
        if not self.accepting:
            raise self._refusal()
        if len(self._calls) >= self.options.max_pending_calls:
            raise Overloaded(f"worker {self.worker_id} has {len(self._calls)} calls in flight")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        call_id = next(self._ids)
        try:
            frame = self._conn.send(wire.Call(call_id, method, params, timeout, flags))
        except wire.UnencodableMessage as exc:
            raise InvalidParams(f"{method}: {exc}") from exc
        stream = bool(flags & wire.FLAG_STREAM)
        call = _Call(call_id, method, trio.current_time(), timeout, stream)
        if stream:
            call.events = collections.deque()
            call.event_arrived = trio.Event()
        self._calls[call_id] = call
        if not self._unacked:
            self._unacked_arrived.set()
        self._unacked[call_id] = call
        self._write_or_queue(frame)
        self._update_load()
        return call

    def _refusal(self) -> DspexError:
        if self._cause is not None:
            return WorkerClosed(f"worker {self.worker_id} is gone: {self._cause[1]}")
        return WorkerClosed(f"worker {self.worker_id} is {self.state} and takes no new calls")

    async def _wait(self, call: _Call) -> Any:
        """Wait for the call's outcome. The ack timeout is watched by ``_ack_watchdog`` for all calls at
        once, so a call without a deadline needs no cancel scope of its own."""
        try:
            if not call.done.is_set():
                if call.timeout is None:
                    await call.done.wait()
                else:
                    with trio.move_on_at(call.sent_at + call.timeout):
                        await call.done.wait()
                    if not call.done.is_set():
                        raise self._timed_out(call)
            assert call.result is not None
            return call.result.unwrap()
        finally:
            if not call.done.is_set():
                self._abandon(call)

    async def _ack_watchdog(self) -> None:
        """Kill the worker when its oldest unacked call is older than ``ack_timeout`` (it is wedged)."""
        timeout = self.options.ack_timeout
        while True:
            if not self._unacked:
                self._unacked_arrived = trio.Event()
                await self._unacked_arrived.wait()
                continue
            oldest = next(iter(self._unacked.values()))
            due = oldest.sent_at + timeout
            if trio.current_time() >= due:
                self._lose(
                    WorkerUnresponsive, f"call {oldest.id} ({oldest.method}) was not acked within {timeout} s"
                )
                return
            await trio.sleep_until(due)

    def _timed_out(self, call: _Call) -> CallTimeout:
        self._abandon(call)
        self._calls_failed += 1
        return CallTimeout(f"{call.method} on worker {self.worker_id} timed out after {call.timeout} s")

    def _abandon(self, call: _Call, error: DspexError | None = None) -> None:
        """The caller gave up (or ``error`` ends the call here): cancel it in the worker; its late frames
        are dropped."""
        if self._calls.pop(call.id, None) is None:
            return
        self._unacked.pop(call.id, None)
        if self._conn.abandon(call.id) and not self._exited.is_set() and self._cause is None:
            self._queue(wire.Cancel(call.id))
        call.finish(outcome.Error(error or WorkerClosed(f"call {call.id} was abandoned by its caller")))
        self._update_load()

    async def _send_now(self, message: wire.ParentMessage) -> None:
        """Write ``message`` (after anything queued) from this task: the ladder must not depend on the
        writer task, which is gone when the worker's owner was cancelled."""
        self._outbox.append(self._conn.send(message))
        with trio.move_on_after(SEND_NOW_TIMEOUT_S):
            async with self._send_lock:
                data = b"".join(self._outbox)
                self._outbox.clear()
                if data:
                    try:
                        await self.process.stdin.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the worker is gone; the ladder goes on

    def _queue(self, message: wire.ParentMessage) -> None:
        self._write_or_queue(self._conn.send(message))

    def _write_or_queue(self, frame: bytes) -> None:
        """Write ``frame`` now when nothing is queued or being written (the pipe is non-blocking, so
        this never waits); otherwise, or for what did not fit, queue it for the writer task. Saves the
        writer-task hop on a lone call (~35 µs per round trip here) and keeps batching under load."""
        if not self._outbox and not self._send_lock.locked() and self._stdin_fd is not None:
            try:
                written = os.write(self._stdin_fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:
                written = 0  # a broken pipe: the writer task meets it too, and the watcher reports why
            if written == len(frame):
                return
            frame = frame[written:]
        self._outbox.append(frame)
        self._writer_wakeup.set()

    async def wait_idle(self) -> None:
        """Wait until no call is in flight."""
        await self._idle.wait()

    def _update_load(self) -> None:
        if not self._calls:
            self._idle.set()
        elif self._idle.is_set():
            self._idle = trio.Event()
        if self.state is WorkerState.READY and len(self._calls) >= self.capacity:
            self._set_state(WorkerState.BUSY, "at capacity")
        elif self.state is WorkerState.BUSY and len(self._calls) < self.capacity:
            self._set_state(WorkerState.READY, "below capacity")

    def _set_state(self, new: WorkerState, reason: str) -> None:
        old = self.state
        if old is new:
            return
        check_transition(old, new)
        self.state = new
        logger.debug("worker %s: %s -> %s (%s)", self.worker_id, old, new, reason)
        if self.on_transition is not None:
            self.on_transition(self, old, new, reason)

    # -- frames in ------------------------------------------------------------------------------------
    def _deliver(self, message: wire.ChildMessage) -> None:
        if isinstance(message, wire.Pong):
            return
        if isinstance(message, wire.Hello):
            self.hello = message
            self._hello_event.set()
            return
        call = self._calls.get(message.id)
        if call is None:  # pragma: no cover - the connection drops frames of abandoned calls
            return
        self._unacked.pop(message.id, None)
        if isinstance(message, wire.Ack):
            call.acked = True
        elif isinstance(message, wire.Event):
            if call.events is None or call.event_arrived is None:
                return  # progress events of a call that did not ask for a stream
            if len(call.events) >= self.options.max_stream_events:
                lag = Overloaded(
                    f"the consumer of streamed call {call.id} lagged {len(call.events)} events behind"
                )
                self._calls_failed += 1
                self._abandon(call, lag)
                return
            call.events.append(message.data)
            call.event_arrived.set()
        elif isinstance(message, wire.Result):
            del self._calls[message.id]
            self._calls_served += 1
            call.finish(outcome.Value(message.value))
            self._update_load()
        elif isinstance(message, wire.Error):
            del self._calls[message.id]
            self._calls_failed += 1
            error = error_from_frame(message, acked=call.acked, worker=self.worker_id)
            call.finish(outcome.Error(error))
            self._update_load()

    async def _read_frames(self) -> None:
        try:
            while True:
                try:
                    data = await self.process.frames.receive_some(READ_CHUNK_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self._last_seen = trio.current_time()
                self._conn.receive_data(data)
                while (message := self._conn.next_event()) is not wire.NEED_DATA:
                    self._deliver(message)  # type: ignore[arg-type]
                if not data:
                    break
        except wire.RemoteProtocolError as exc:
            self._lose(ProtocolError, f"protocol error: {exc}")
            return
        finally:
            self._reader_done.set()
        with trio.move_on_after(EOF_EXIT_GRACE_S):
            await self._exited.wait()
        if not self._exited.is_set():
            self._lose(ProtocolError, "the worker closed its frame stream but kept running")

    async def _write_frames(self) -> None:
        while True:
            await self._writer_wakeup.wait()
            self._writer_wakeup = trio.Event()
            async with self._send_lock:
                while self._outbox:
                    data = b"".join(self._outbox)
                    self._outbox.clear()
                    try:
                        await self.process.stdin.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # the worker is gone; the watcher reports how

    async def _read_stderr(self) -> None:
        pending = b""
        while True:
            try:
                data = await self.process.stderr.receive_some(STDERR_READ_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                if pending:
                    self._log_stderr(pending)
                return
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            while len(pending) > MAX_STDERR_LINE_BYTES:
                lines.append(pending[:MAX_STDERR_LINE_BYTES])
                pending = pending[MAX_STDERR_LINE_BYTES:]
            for line in lines:
                self._log_stderr(line)

    def _log_stderr(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        self._stderr_tail.append(text)
        if logger.isEnabledFor(logging.INFO):
            logger.info("[%s] %s", self.worker_id, text, extra={"worker_id": self.worker_id})

    async def _heartbeat(self) -> None:
        interval = self.options.heartbeat_interval
        limit = interval * self.options.heartbeat_missed
        for nonce in itertools.count(1):
            await trio.sleep(interval)
            if self._closing or self._cause is not None:
                return
            silent = trio.current_time() - self._last_seen
            if silent > limit:
                self._lose(
                    WorkerUnresponsive, f"no answer to heartbeats for {silent:.2f} s (limit {limit} s)"
                )
                return
            self._queue(wire.Ping(nonce))

    # -- losing the worker ----------------------------------------------------------------------------
    def _lose(self, kind: type[DspexError], reason: str) -> None:
        """A detector found the worker broken: record why and kill it; the watcher fails its calls."""
        if self._cause is not None or self._exited.is_set():
            return
        self._cause = (kind, reason)
        self._hello_event.set()  # wakes a handshake in progress
        logger.warning("worker %s (pid %d): %s; killing it", self.worker_id, self.pid, reason)
        self.process.signal_group(signal.SIGKILL)

    async def _await_exit(self) -> ExitStatus:
        """Wait for the process to exit and be reaped (works without the watcher task)."""
        status = await self.process.wait()
        if self._exit_status is None:
            self._exit_status = status
        self._exited.set()
        self._hello_event.set()  # wakes a handshake in progress
        return status

    async def _watch_exit(self) -> None:
        status = await self._await_exit()
        with trio.move_on_after(READER_DRAIN_AFTER_EXIT_S):
            await self._reader_done.wait()
        self._settle(status)

    def _settle(self, status: ExitStatus) -> None:
        """The process is gone: final state, and every call still pending fails (once)."""
        if self.hello is not None and self.state not in TERMINAL:
            if self._closing and self._cause is None and status.code == 0:
                self._set_state(WorkerState.STOPPED, "shut down")
            else:
                self._set_state(WorkerState.FAILED, self._cause[1] if self._cause else status.describe())
        calls = list(self._calls.values())
        self._calls.clear()
        self._unacked.clear()
        self._idle.set()
        self._conn.forget_all()
        for call in calls:
            self._calls_failed += 1
            call.finish(outcome.Error(self._loss_error(call, status)))

    def _loss_error(self, call: _Call, status: ExitStatus) -> DspexError:
        what = f"worker {self.worker_id} (pid {self.pid})"
        where = "after it was acked" if call.acked else "before it was acked"
        if self._cause is not None:
            kind, reason = self._cause
            message = f"{what}: {reason}; call {call.id} ({call.method}) lost {where}"
            if kind is ProtocolError:
                return ProtocolError(message, started=call.acked)
            return WorkerUnresponsive(message, started=call.acked, exit_status=status)
        if self._closing:
            return WorkerClosed(
                f"{what} shut down ({status.describe()}) with call {call.id} ({call.method}) unfinished"
            )
        return WorkerCrashed(
            f"{what} died ({status.describe()}) with call {call.id} ({call.method}) in flight, {where}",
            started=call.acked,
            exit_status=status,
        )

    # -- the service ----------------------------------------------------------------------------------
    async def _serve(self, *, task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the worker's tasks until it is torn down; ``started`` once the handshake completed."""
        failure: WorkerStartFailed | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_frames)
            nursery.start_soon(self._write_frames)
            nursery.start_soon(self._read_stderr)
            nursery.start_soon(self._watch_exit)
            try:
                try:
                    await self._handshake()
                except WorkerStartFailed as exc:
                    failure = exc  # raised outside the nursery, so not wrapped in a group
                else:
                    self._last_seen = trio.current_time()
                    self._set_state(WorkerState.READY, "hello received")
                    nursery.start_soon(self._heartbeat)
                    nursery.start_soon(self._ack_watchdog)
                    task_status.started(self)
                    await self._torn_down.wait()
                    with trio.move_on_after(READER_DRAIN_AFTER_EXIT_S):
                        await self._reader_done.wait()
            finally:
                # Also when cancelled from outside: the ladder does not rely on these tasks, and the
                # calls still pending are failed here if the watcher could not do it.
                with trio.CancelScope(shield=True):
                    await self.aclose()
                    if self._exit_status is not None:
                        self._settle(self._exit_status)
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _handshake(self) -> None:
        with trio.move_on_after(self.options.start_timeout):
            await self._hello_event.wait()  # set by the hello, the process's exit, or a detector
        if self.hello is not None and self._cause is None and not self._exited.is_set():
            return
        if not self._exited.is_set() and self._cause is None:
            self._lose(WorkerStartFailed, f"no hello within {self.options.start_timeout} s")
        with trio.move_on_after(KILL_REAP_TIMEOUT_S):
            await self._await_exit()
        status = self._exit_status
        self._set_state(WorkerState.FAILED, "start failed")
        reason = (
            self._cause[1]
            if self._cause
            else f"exited before its hello ({status.describe() if status else '?'})"
        )
        tail = "\n".join(self.stderr_tail[-10:])
        raise WorkerStartFailed(
            f"worker {self.worker_id} (pid {self.pid}) failed to start: {reason}"
            + (f"\n--- its stderr ---\n{tail}" if tail else ""),
            exit_status=status,
        )


class CallStream:
    """The events of one streamed call, then its result. Iterate with ``async for``."""

    def __init__(self, worker: Worker, call: _Call) -> None:
        self._worker = worker
        self._call = call

    def __aiter__(self) -> CallStream:
        return self

    async def __anext__(self) -> Any:
        call = self._call
        assert call.events is not None and call.event_arrived is not None
        while not call.events:
            if call.done.is_set():
                raise StopAsyncIteration
            await call.event_arrived.wait()
            call.event_arrived = trio.Event()
        return call.events.popleft()

    async def result(self) -> Any:
        """Wait for the terminal frame (skipping unread events) and return the value or raise its error."""
        value = await self._worker._wait(self._call)
        if self._call.events is not None:
            self._call.events.clear()
        return value


def next_worker_id() -> str:
    return f"w{next(_worker_ids)}"


async def start_worker(
    nursery: trio.Nursery,
    *,
    launcher: Launcher,
    spec: WorkerSpec,
    options: WorkerOptions,
    on_transition: TransitionCallback | None = None,
) -> Worker:
    """Launch a worker whose tasks run in ``nursery``; returns once its handshake completed.

    Raises:
        WorkerStartFailed: it could not be launched, exited before its ``hello``, or was too slow.
    """
    try:
        process = await launcher.launch(spec)
    except OSError as exc:
        raise WorkerStartFailed(f"worker {spec.worker_id} could not be launched: {exc}") from exc
    worker = Worker(
        spec.worker_id, process, options, launcher_name=launcher.name, on_transition=on_transition
    )
    result: Worker = await nursery.start(worker._serve)
    return result


@asynccontextmanager
async def open_worker(
    *,
    diagnostics: bool = False,
    launcher: Launcher | None = None,
    worker_id: str | None = None,
    on_transition: TransitionCallback | None = None,
    **options: Any,
) -> AsyncIterator[Worker]:
    """Start one ``bridge_child`` worker process, owned by this context.

    Returns once the worker's ``hello`` arrived (within ``start_timeout``). Leaving the block runs the
    teardown ladder (shutdown frame -> grace -> SIGTERM -> grace -> SIGKILL -> reap): nothing is left
    running. ``options`` are the fields of :class:`WorkerOptions`.
    """
    opts = WorkerOptions.from_kwargs(options)
    spec = WorkerSpec(
        worker_id=worker_id or next_worker_id(),
        diagnostics=diagnostics,
        capacity=opts.capacity,
        max_frame_bytes=opts.max_frame_bytes,
    )
    async with open_service_nursery() as nursery:
        worker = await start_worker(
            nursery,
            launcher=launcher or SubprocessLauncher(),
            spec=spec,
            options=opts,
            on_transition=on_transition,
        )
        try:
            yield worker
        finally:
            with trio.CancelScope(shield=True):
                await worker.aclose()
