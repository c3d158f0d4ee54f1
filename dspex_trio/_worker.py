"""The worker handle: one ``bridge_child`` process, owned by a nursery, many calls multiplexed by id.

Tasks (all in the worker's own nursery): a reader routes frames to their calls, a writer coalesces
queued frames into few writes, a stderr relay (``_stderr.py``) re-logs the worker's output with its id,
a watcher waits for the process to exit and fails what is left, and a heartbeat pings it. Detectors
(protocol error, missed heartbeats, missing ack, EOF, no hello in time) record a cause, fail the worker
and kill its process; the watcher then fails every pending call once, with the cause's error and the
exit code or signal, when the process is reaped.

The worker's state (``dspex_trio._states``) changes only in ``Worker._change(input)``, which consults
the one table and publishes the change. Its options and statistics records are in ``_options.py`` and
``_statistics.py``.

One concept, past ~600 lines: the handle's call path (``_submit``, ``_write_or_queue``,
``_deliver``, ``_wait``: the fastest code of the runtime, together with the dispatch loop), its
detectors and its teardown ladder all read and change the same per-call tables and the same state, so
they stay one class in one module rather than a class split across files.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import outcome
import trio

from bridge_child import wire
from dspex_trio import _log_context as log_context
from dspex_trio._deadline import current_effective_deadline
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
from dspex_trio._exports import NoPublicConstructor
from dspex_trio._launcher import Launcher, WorkerProcess, WorkerSpec, default_launcher
from dspex_trio._lm_budgets import LeaseDesk, LMBudgets
from dspex_trio._options import WorkerOptions, options_from
from dspex_trio._states import (
    ACCEPTING,
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    WorkerInput,
    WorkerState,
    next_state,
)
from dspex_trio._statistics import WorkerStatistics
from dspex_trio._stderr import StderrRelay
from dspex_trio._tracing import ingest_worker_spans
from dspex_trio._util import open_service_nursery

logger = logging.getLogger("dspex_trio.worker")

READ_CHUNK_BYTES: Final = 256 * 1024
"""Most bytes taken from a worker's frame pipe per read."""
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
_CANCELS_QUEUED: trio.lowlevel.RunVar[set[Worker]] = trio.lowlevel.RunVar("dspex_trio_cancels_queued")
"""The workers whose outbox holds ``cancel`` frames queued by abort hooks and not yet written: the
first cancelled task to unwind writes them all, every worker's, not only its own worker's."""

_worker_ids = itertools.count(1)


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
    trace: str = ""
    """The ``traceparent`` it was sent with (a traced call), else empty."""
    waiter: trio.lowlevel.Task | None = None
    """The task parked in ``Worker._park`` for the outcome (rescheduled by ``finish``)."""
    cancel_queued: bool = False
    """Its ``cancel`` frame is queued or written (once per call)."""

    def finish(self, result: outcome.Outcome[Any]) -> None:
        if self.done.is_set():
            return
        self.result = result
        self.done.set()
        if self.event_arrived is not None:
            self.event_arrived.set()
        if self.waiter is not None:
            task, self.waiter = self.waiter, None
            trio.lowlevel.reschedule(task)


@attrs.define(eq=False)
class Worker(metaclass=NoPublicConstructor):
    """A handle on one running worker process. Made by :func:`open_worker` (or a pool, or the bridge;
    ``Worker(...)`` raises ``TypeError``).

    ``call()`` may be used from many tasks at once; calls are multiplexed by id on one pipe.
    """

    worker_id: str
    process: WorkerProcess
    options: WorkerOptions
    launcher_name: str = ""
    on_transition: TransitionCallback | None = None
    hello: wire.Hello | None = None
    """The worker's hello, once it came (its pid, capacity, methods, library versions)."""
    lm_budgets: LMBudgets | None = None
    """The pool's LM budgets, which answer the worker's leases (a worker started with ``--lease-lms``);
    None: every lease is granted at once."""
    _desk: LeaseDesk | None = attrs.field(init=False, default=None)
    _state: WorkerState = attrs.field(init=False, default=WorkerState.STARTING)
    """Changed only by ``_change``."""
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
    _frames_fd: trio.lowlevel.FdStream | None = None
    """``process.frames`` when it is a pipe (``FdStream``): a lone call's caller reads its reply from
    it directly (``_read_nowait``); None for other streams (sockets), which only the reader reads."""
    _hello_event: trio.Event = attrs.Factory(trio.Event)
    """Wakes the handshake: set by the hello, the process's exit, or a detector."""
    _reader_done: trio.Event = attrs.Factory(trio.Event)
    _exited: trio.Event = attrs.Factory(trio.Event)
    """The process was reaped. A fact of the OS process, apart from the state: the state follows it
    only in ``_settle``, once the reader delivered what the worker wrote before it exited."""
    _torn_down: trio.Event = attrs.Factory(trio.Event)
    """The teardown ladder finished: the process is reaped and its pipes are closed."""
    _exit_status: ExitStatus | None = None
    _cause: tuple[type[DspexError], str] | None = None
    """Why a detector killed it: the error its calls fail with, and the reason. The state says *that*
    it failed; this says why, for the calls, which fail only once the process is reaped."""
    _ladder_started: bool = False
    """``aclose`` began the teardown ladder, which runs once. Not a state: a worker that already
    failed is still torn down (its process reaped, its pipes closed)."""
    _last_seen: float = 0.0
    _stderr: StderrRelay = attrs.field(init=False)
    """Re-logs the worker's stderr under its id (``dspex_trio.worker`` logger) and keeps its last lines."""
    _calls_served: int = 0
    _calls_failed: int = 0

    def __attrs_post_init__(self) -> None:
        fileno = getattr(self.process.stdin, "fileno", None)
        self._stdin_fd = fileno() if callable(fileno) else None
        frames = getattr(self.process, "frames", None)
        self._frames_fd = frames if isinstance(frames, trio.lowlevel.FdStream) else None
        self._conn = wire.Connection(wire.Role.PARENT, max_frame_bytes=self.options.max_frame_bytes)
        self._stderr = StderrRelay(self.worker_id, logger, extra={"worker_id": self.worker_id})
        self._idle.set()
        if self.lm_budgets is not None:
            self._desk = LeaseDesk(self.lm_budgets, self._answer_lease)

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
    def state(self) -> WorkerState:
        """Its state (see ``dspex_trio._states``)."""
        return self._state

    @property
    def accepting(self) -> bool:
        """True while the worker takes new calls (``ready`` or ``busy``)."""
        return self._state in ACCEPTING

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._exit_status

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines the worker wrote to stderr."""
        return self._stderr.tail

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            worker_id=self.worker_id,
            pid=self.pid,
            state=self._state,
            in_flight=len(self._calls),
            capacity=self.capacity,
            calls_served=self._calls_served,
            calls_failed=self._calls_failed,
            late_frames=self._conn.late_frames,
            launcher=self.launcher_name,
            node=getattr(self.process, "node", ""),
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
        any, is dropped. The worker is told the caller's deadline: the earlier of ``timeout`` and the
        caller's effective Trio deadline (``with trio.move_on_after(0.5)`` around the call reaches the
        worker as ``timeout=0.5`` does; then the caller gets plain ``trio.Cancelled``).
        """
        flags = wire.FLAG_IDEMPOTENT if idempotent else 0
        call = self._submit(method, params, timeout=timeout, flags=flags)
        return await self._wait(call)

    @asynccontextmanager
    async def stream(
        self, method: str, params: Any = None, *, timeout: float | None = None
    ) -> AsyncIterator[CallStream]:
        """Run a streamed call: iterate its events, then read ``.result``.

        Leaving the block early cancels the call in the worker. The deadline the worker is told is that
        of :meth:`call`. Entering is a checkpoint (before anything is sent).
        """
        await trio.lowlevel.checkpoint()
        call = self._submit(method, params, timeout=timeout, flags=wire.FLAG_STREAM)
        stream = CallStream(self, call)
        try:
            yield stream
        finally:
            if not call.done.is_set():
                self._abandon(call)

    async def aclose(self, *, grace: float | None = None) -> None:
        """The teardown ladder: ``shutdown`` frame -> grace -> SIGTERM to the group -> grace -> SIGKILL
        -> reap, then (once the reader drained the frame pipe) close the pipes. Shielded and bounded;
        safe to call more than once (later calls wait for the first).

        ``grace`` overrides ``options.shutdown_grace`` (a pool that already drained its calls passes 0).
        """
        shutdown_grace = self.options.shutdown_grace if grace is None else grace
        if self._ladder_started:
            with trio.CancelScope(shield=True):
                await self._torn_down.wait()
            return
        self._ladder_started = True
        with trio.CancelScope(shield=True):
            try:
                handshaken = self._state in ACCEPTING  # it said hello and is not lost: it can drain
                if self._state not in TERMINAL:
                    self._change(WorkerInput.CLOSE)
                if handshaken and not self._exited.is_set():
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
                # What it wrote before it exited is still delivered before its pipes close: a worker
                # lost to a detector is failed (and closed by its owner) before it is reaped.
                with trio.move_on_after(READER_DRAIN_AFTER_EXIT_S):
                    await self._reader_done.wait()
                await self.process.aclose()
            finally:
                self._torn_down.set()

    # -- calls ----------------------------------------------------------------------------------------
    def _submit(
        self, method: str, params: Any, *, timeout: float | None, flags: int, trace: str = ""
    ) -> _Call:
        if not self.accepting:
            raise self._refusal()
        if len(self._calls) >= self.options.max_pending_calls:
            raise Overloaded(f"worker {self.worker_id} has {len(self._calls)} calls in flight")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        call_id = next(self._ids)
        now = trio.current_time()
        try:
            wire_timeout = _wire_timeout(timeout, now)
            frame = self._conn.send(
                wire.TracedCall(call_id, method, params, wire_timeout, flags, trace)
                if trace
                else wire.Call(call_id, method, params, wire_timeout, flags)
            )
        except wire.UnencodableMessage as exc:
            raise InvalidParams(f"{method}: {exc}") from exc
        stream = bool(flags & wire.FLAG_STREAM)
        call = _Call(call_id, method, now, timeout, stream, trace=trace)
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
        return WorkerClosed(f"worker {self.worker_id} is {self._state} and takes no new calls")

    async def _wait(self, call: _Call) -> Any:
        """Wait for the call's outcome. The ack timeout is watched by ``_ack_watchdog`` for all calls at
        once, so a call without a deadline needs no cancel scope of its own."""
        try:
            if len(self._calls) == 1 and not call.done.is_set():
                self._read_nowait()  # a lone call: its reply may be there already
            if call.done.is_set():
                await trio.lowlevel.checkpoint()  # a checkpoint, as a wait would be
            elif call.timeout is None:
                await self._park(call)
            else:
                with trio.move_on_at(call.sent_at + call.timeout):
                    await self._park(call)
                if not call.done.is_set():
                    raise self._timed_out(call)
            assert call.result is not None
            return call.result.unwrap()
        finally:
            if not call.done.is_set():
                self._abandon(call)

    def _read_nowait(self) -> None:
        """Read and deliver what the worker has already written to the frame pipe, without waiting.

        A lone call's caller does this right after its frame went out: when the worker answered while
        this task ran (one CPU, or a fast answer), the reply is delivered here and the caller goes on
        after one checkpoint, instead of the reader task waking, reading and rescheduling the caller
        (a task hop and an extra read). Nothing there, or a pipe that is not ours to read now (closed,
        at EOF, failing): nothing happens, and the reader task meets the same bytes or condition as
        always. Only frames the pipe held are consumed; their order is the pipe's, as for the reader.
        """
        stream = self._frames_fd
        if stream is None:
            return
        fd = stream.fileno()  # -1 once the stream is closed
        if fd < 0:
            return
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except OSError:  # nothing yet (BlockingIOError), or the pipe broke: the reader handles it
            return
        if not data:
            return  # EOF: it stays, and the reader ends the stream when it meets it
        try:
            self._take(data)
        except wire.RemoteProtocolError as exc:
            self._lose(ProtocolError, f"protocol error: {exc}")

    def _take(self, data: bytes | bytearray) -> None:
        """Deliver what ``data`` (read from the frame stream: by the reader, or a lone caller) completes;
        ``b""`` is the end of the stream. Raises ``wire.RemoteProtocolError`` on a malformed stream."""
        self._last_seen = trio.current_time()
        self._conn.receive_data(data)
        while (message := self._conn.next_event()) is not wire.NEED_DATA:
            self._deliver(message)  # type: ignore[arg-type]

    async def _park(self, call: _Call) -> None:
        """Wait until ``call`` is done. If the wait is cancelled, the call's ``cancel`` frame is queued
        by the abort hook, inside the canceller's ``CancelScope.cancel()``, before any cancelled task
        runs; the first of them to unwind (``_abandon``) writes what is queued. So cancelling a thousand
        calls at once sends their ``cancel`` frames in one write per worker within a few ms, not one
        write per task as each of them unwinds (which took ~0.2 s at 1,000; docs/lm.md).

        Raises ``trio.Cancelled`` as ``trio.Event.wait`` would; the call is then still pending here
        (the caller's ``finally`` abandons it)."""
        call.waiter = trio.lowlevel.current_task()

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            call.waiter = None
            self._queue_cancel(call)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _queue_cancel(self, call: _Call) -> None:
        """Queue ``call``'s ``cancel`` frame for the writer (once; nothing if the call ended or the
        worker is gone). Never raises: it runs in a cancel scope's abort hook."""
        if call.cancel_queued or call.id not in self._calls:
            return
        if self._state in TERMINAL or self._exited.is_set() or not self._conn.abandon(call.id):
            return
        try:
            frame = self._conn.send(wire.Cancel(call.id))
        except wire.ProtocolError:  # pragma: no cover - the checks above keep it allowed
            return
        call.cancel_queued = True
        self._outbox.append(frame)  # not the writer's wake-up: it would hold the send lock through a
        # checkpoint, after every cancelled task, and the frames would wait for all of them
        _cancels_queued().add(self)

    def _write_outbox_nowait(self) -> None:
        """Write what the outbox holds now, if the writer task is not writing (the pipe is
        non-blocking: what does not fit stays queued for the writer)."""
        if not self._outbox:
            return
        if self._send_lock.locked() or self._stdin_fd is None:
            self._writer_wakeup.set()
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        try:
            written = os.write(self._stdin_fd, data)
        except OSError:  # full, or a broken pipe: the writer task meets it too
            written = 0
        if written < len(data):
            self._outbox.append(data[written:])
            self._writer_wakeup.set()

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
        if call.cancel_queued:  # by ``_park``'s abort hook, with those of every call cancelled with it
            queued = _cancels_queued()
            while queued:  # every worker's, not only this one's
                queued.pop()._write_outbox_nowait()
        if self._calls.pop(call.id, None) is None:
            return
        self._unacked.pop(call.id, None)
        if (
            not call.cancel_queued
            and self._conn.abandon(call.id)
            and self._state not in TERMINAL
            and not self._exited.is_set()
        ):
            call.cancel_queued = True
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
        state = self._state
        if state is WorkerState.READY and len(self._calls) >= self.capacity:
            self._change(WorkerInput.AT_CAPACITY)
        elif state is WorkerState.BUSY and len(self._calls) < self.capacity:
            self._change(WorkerInput.BELOW_CAPACITY)

    def _change(self, event: WorkerInput, reason: str | None = None) -> None:
        """The one place the worker's state changes: ``TRANSITIONS[state, event]``, published to
        ``on_transition`` with ``reason`` (by default the input's own name).

        Raises:
            InvalidTransition: the table does not allow ``event`` now (a bug); nothing changed.
        """
        old = self._state
        new = self._state = next_state(TRANSITIONS, old, event, InvalidTransition)
        if reason is None:
            reason = event.value
        logger.debug("worker %s: %s -> %s (%s)", self.worker_id, old, new, reason)
        if self.on_transition is not None:
            self.on_transition(self, old, new, reason)

    # -- frames in ------------------------------------------------------------------------------------
    def _deliver(self, message: wire.ChildMessage) -> None:
        # ``type(m) is`` rather than ``isinstance``: a failed isinstance on a msgspec Struct costs
        # ~0.2 us, and every frame of every call comes through here (the kinds are exact types).
        if type(message) is wire.Pong:
            return
        if type(message) is wire.Hello:
            self.hello = message
            self._hello_event.set()
            return
        if type(message) is wire.LeaseRequest:
            if self._desk is not None:
                self._desk.request(message)
            else:
                self._answer_lease(wire.LeaseGrant(message.lease))
            return
        if type(message) is wire.LeaseRelease:
            if self._desk is not None:
                self._desk.release(message)
            return
        call = self._calls.get(message.id)  # type: ignore[union-attr]
        if call is None:  # pragma: no cover - the connection drops frames of abandoned calls
            return
        self._unacked.pop(call.id, None)
        if type(message) is wire.Ack:
            call.acked = True
        elif type(message) is wire.Result:
            del self._calls[call.id]
            self._calls_served += 1
            value = message.value
            if call.trace and isinstance(value, dict) and "trace_spans" in value:
                ingest_worker_spans(value.pop("trace_spans"), call.trace)
            call.finish(outcome.Value(value))
            self._update_load()
        elif type(message) is wire.Error:
            del self._calls[call.id]
            self._calls_failed += 1
            if call.trace and type(message.details) is dict and "trace_spans" in message.details:
                message = _spans_taken(message, call.trace)
            error = error_from_frame(message, acked=call.acked, worker=self.worker_id)
            call.finish(outcome.Error(error))
            self._update_load()
        elif type(message) is wire.Event:
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

    def _answer_lease(self, grant: wire.LeaseGrant) -> None:
        """Send the answer to a lease, if the worker still has it pending (not if the worker is gone)."""
        if self._conn.lease_state(grant.lease) in (wire.LeaseState.REQUESTED, wire.LeaseState.ABANDONED):
            self._queue(grant)

    async def _read_frames(self) -> None:
        try:
            while True:
                try:
                    data = await self.process.frames.receive_some(READ_CHUNK_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                self._take(data)
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

    async def _heartbeat(self) -> None:
        interval = self.options.heartbeat_interval
        limit = interval * self.options.heartbeat_missed
        for nonce in itertools.count(1):
            await trio.sleep(interval)
            if self._state not in ACCEPTING:  # draining, or gone
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
        """A detector found the worker broken: record why, kill it, and it has failed; the watcher
        fails its calls once the process is reaped. Nothing to do for a worker already terminal, or
        already reaped (its exit is reported as it is, and its pid may be reused)."""
        if self._state in TERMINAL or self._exited.is_set():
            return
        self._cause = (kind, reason)
        logger.warning("worker %s (pid %d): %s; killing it", self.worker_id, self.pid, reason)
        self.process.signal_group(signal.SIGKILL)
        self._change(WorkerInput.LOST, reason)
        self._hello_event.set()  # wakes a handshake in progress

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
        """The process is gone: its exit is the state's last input (unless a detector failed it
        already), and every call still pending fails (once). Safe to call again."""
        closing = self._state is WorkerState.DRAINING
        if self._state not in TERMINAL:
            exit_input = WorkerInput.EXITED_CLEAN if status.code == 0 else WorkerInput.DIED
            self._change(exit_input, status.describe())
        calls = list(self._calls.values())
        self._calls.clear()
        self._unacked.clear()
        self._idle.set()
        self._conn.forget_all()
        for call in calls:
            self._calls_failed += 1
            call.finish(outcome.Error(self._loss_error(call, status, closing=closing)))

    def _loss_error(self, call: _Call, status: ExitStatus, *, closing: bool) -> DspexError:
        what = f"worker {self.worker_id} (pid {self.pid})"
        where = "after it was acked" if call.acked else "before it was acked"
        if self._cause is not None:
            kind, reason = self._cause
            message = f"{what}: {reason}; call {call.id} ({call.method}) lost {where}"
            if kind is ProtocolError:
                return ProtocolError(message, started=call.acked)
            return WorkerUnresponsive(message, started=call.acked, exit_status=status)
        if closing:
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
            nursery.start_soon(self._stderr.run, self.process.stderr)
            nursery.start_soon(self._watch_exit)
            if self._desk is not None:
                await nursery.start(self._desk.serve)
            try:
                try:
                    await self._handshake()
                except WorkerStartFailed as exc:
                    failure = exc  # raised outside the nursery, so not wrapped in a group
                else:
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
        """Wait for the hello: the worker is ``ready`` once it came (and the process still runs).
        Otherwise it failed: lost (no hello in time, or a detector), or it exited before.

        Raises:
            WorkerStartFailed: it failed to start (then it is ``failed``).
        """
        with trio.move_on_after(self.options.start_timeout):
            await self._hello_event.wait()
        starting = self._state is WorkerState.STARTING and not self._exited.is_set()
        if starting and self.hello is not None:
            self._last_seen = trio.current_time()
            self._change(WorkerInput.HELLO)
            return
        if starting:
            self._lose(WorkerStartFailed, f"no hello within {self.options.start_timeout} s")
        with trio.move_on_after(KILL_REAP_TIMEOUT_S):
            await self._await_exit()
        status = self._exit_status
        if status is not None:
            self._settle(status)  # exited before its hello (the watcher may have settled it already)
        assert self._state is WorkerState.FAILED, self._state  # lost, or exited
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


def _spans_taken(message: wire.Error, trace: str) -> wire.Error:
    """The error frame of a traced call without the worker's spans in its details, once they are
    exported (``_tracing.ingest_worker_spans``): they never reach the caller."""
    details = dict(message.details)
    ingest_worker_spans(details.pop("trace_spans"), trace)
    return wire.Error(message.id, message.code, message.type, message.message, details or None)


def _cancels_queued() -> set[Worker]:
    try:
        return _CANCELS_QUEUED.get()
    except LookupError:
        queued: set[Worker] = set()
        _CANCELS_QUEUED.set(queued)
        return queued


def _wire_timeout(timeout: float | None, now: float) -> float | None:
    """The seconds a call sent at ``now`` tells its worker it has (``Call.timeout``): ``timeout``, or less
    when the caller's effective Trio deadline (a ``move_on_after`` around the call) comes first; None when
    there is neither. Only ``timeout`` is the handle's own to enforce (``CallTimeout``): the caller's
    deadline cancels the caller, and with it the call in the worker."""
    left = current_effective_deadline() - now  # Trio's, read in one loop (_deadline)
    if timeout is not None and timeout <= left:
        return timeout
    return None if left == math.inf else max(0.0, left)


def next_worker_id() -> str:
    return f"w{next(_worker_ids)}"


async def start_worker(
    nursery: trio.Nursery,
    *,
    launcher: Launcher,
    spec: WorkerSpec,
    options: WorkerOptions,
    on_transition: TransitionCallback | None = None,
    lm_budgets: LMBudgets | None = None,
) -> Worker:
    """Launch a worker whose tasks run in ``nursery``; returns once its handshake completed.

    Raises:
        WorkerStartFailed: it could not be launched, exited before its ``hello``, or was too slow.
    """
    try:
        process = await launcher.launch(spec)
    except OSError as exc:
        raise WorkerStartFailed(f"worker {spec.worker_id} could not be launched: {exc}") from exc
    worker = Worker._create(
        spec.worker_id,
        process,
        options,
        launcher_name=launcher.name,
        on_transition=on_transition,
        lm_budgets=lm_budgets,
    )
    with log_context.bound(worker_id=spec.worker_id):  # the worker's tasks log with its id
        result: Worker = await nursery.start(worker._serve)
    return result


@asynccontextmanager
async def open_worker(
    *,
    diagnostics: bool = False,
    launcher: Launcher | None = None,
    worker_id: str | None = None,
    on_transition: TransitionCallback | None = None,
    options: WorkerOptions | None = None,
    **option_fields: Any,
) -> AsyncIterator[Worker]:
    """Start one ``bridge_child`` worker process, owned by this context.

    Returns once the worker's ``hello`` arrived (within ``start_timeout``). Leaving the block runs the
    teardown ladder (shutdown frame -> grace -> SIGTERM -> grace -> SIGKILL -> reap): nothing is left
    running. ``options`` is a :class:`WorkerOptions`; or pass its fields as keywords (``option_fields``),
    not both (``TypeError``).
    """
    opts = options_from(WorkerOptions, options, option_fields)
    spec = WorkerSpec(
        worker_id=worker_id or next_worker_id(),
        diagnostics=diagnostics,
        capacity=opts.capacity,
        max_frame_bytes=opts.max_frame_bytes,
        programs=opts.programs,
        async_capacity=opts.async_capacity,
    )
    async with open_service_nursery() as nursery:
        worker = await start_worker(
            nursery,
            launcher=default_launcher(launcher, opts.worker_env),
            spec=spec,
            options=opts,
            on_transition=on_transition,
        )
        try:
            yield worker
        finally:
            with trio.CancelScope(shield=True):
                await worker.aclose()
