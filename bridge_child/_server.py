"""The worker loop: a blocking reader thread that acks every call and runs the CPU-bound ones itself,
and a thread pool that runs the rest.

Why not a Trio event loop in the child: see docs/worker.md. In short, a blocking reader answers a no-op
call in one ``os.read`` + one ``os.write`` with no event-loop hop, ~50 µs faster per round trip here,
and the work itself (DSPy calls) is blocking code that must run in threads either way.

Threads:
- the *reader* reads frames from stdin, acks each call before any work on it, answers pings and
  cancels (at once when idle; while it runs lane calls, within ~3 ms plus the lane call running),
  runs the few *inline* methods (cheap, non-blocking) itself, runs the calls of the *CPU lane*
  itself (one at a time, see below), and hands the rest to
- a ``ThreadPoolExecutor`` of ``capacity`` threads (calls beyond it are acked and wait their turn);
- a *relief* thread, on standby: when a lane call has kept the reader busy for ``RELIEF_AFTER_S`` it
  becomes the reader, so pings, cancels and acks keep flowing during a long CPU-bound call; the relieved
  thread finishes the lane's queue and goes on standby in turn (the two threads swap roles);
- a watchdog thread blocked in ``poll()`` for a hang-up on stdin: when the parent is gone the worker
  exits, even if the reader is stuck (the ``hang`` diagnostic) or every thread is busy.
All frame writes go through one lock, which also guards the connection's state and each call's
"finished" flag, so every call gets exactly one terminal frame.

The CPU lane. CPU-bound calls (a method's ``lane`` predicate says which: DSPy executions with the
in-process offline LM) gain nothing from threads, since they hold the GIL, and lose a lot to them: on
the 2-core VM this was measured on, handing a ~450 µs execution to a pool thread made it cost ~700 µs of
CPU (thread wake-ups, GIL hand-offs and cold caches), while the reader running it right after reading
it, with no hand-off at all, keeps it near the in-process cost. So lane calls are queued in arrival
order (once their acks are written) and run by the reader between reads; while the lane has work the
reader reads (without blocking) only when its held results are due (``MAX_RESULT_HOLD_S``), and writes
them with the acks of what it read. A lane call that was cancelled but goes on does not hold up the
calls behind it: they move to the thread pool. Figures in docs/worker.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, NoReturn

from bridge_child import __version__, wire
from bridge_child._context import CallContext, MethodError
from bridge_child._methods import Method, build_registry

READ_CHUNK_BYTES: Final = 256 * 1024
"""Most bytes taken from stdin per read."""
DEFAULT_CAPACITY: Final = 64
"""Calls a worker runs at once (threads); I/O-bound LM calls mostly wait, so this is generous."""
EXIT_PROTOCOL_ERROR: Final = 3
"""Exit code when the parent sent something the protocol does not allow."""
EXIT_STARTUP_FAILURE: Final = 4
"""Exit code for a worker told to fail at start (diagnostics) or unable to start."""
MAX_RESULT_HOLD_S: Final = 0.003
"""Seconds the reader may hold finished lane results to write them with later ones: while the lane has
calls queued, its results go out together (one write, one wake-up of the parent) unless the oldest has
waited this long; they also go out with any ack or pong, and whenever the reader is about to block."""
RELIEF_AFTER_S: Final = 0.025
"""Seconds a CPU-lane call may keep the reader before the standby thread takes over reading (pings,
cancels and acks are answered within about twice this while a long CPU-bound call runs)."""
STANDBY_PARK_AFTER_S: Final = 1.0
"""Seconds without lane work after which the standby thread stops checking and sleeps until woken."""


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _exit_now(code: int) -> None:
    """Leave at once: no joining of threads that may be stuck in user code."""
    try:
        sys.stderr.flush()
    finally:
        os._exit(code)


def _parent_gone() -> None:
    """The parent closed our stdin or died: exit now, and take our own process group (any grandchildren
    this worker started) with us, since no parent is left to run the teardown ladder."""
    try:
        sys.stderr.flush()
        if os.getpgid(0) == os.getpid():
            os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


def _kill_own_group_but_self() -> None:
    """SIGKILL every other process of our process group (grandchildren this worker started), for a clean
    exit after a shutdown: the parent also signals the group once it has reaped us, but a parent killed
    between the two never would, and the grandchildren would outlive everything. (``killpg`` would kill
    us too, and a clean shutdown must exit 0.) Linux: the group is read from ``/proc``."""
    me = os.getpid()
    try:
        if os.getpgid(0) != me:
            return
        names = os.listdir("/proc")
    except OSError:  # pragma: no cover - no /proc: the parent's signal to the group is all there is
        return
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            if int(data[data.rindex(b")") + 2 :].split()[2]) == me:
                os.kill(int(name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


class Worker:
    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        *,
        capacity: int = DEFAULT_CAPACITY,
        diagnostics: bool = False,
        worker_id: str = "",
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.capacity = capacity
        self.diagnostics = diagnostics
        self.worker_id = worker_id
        self.conn = wire.Connection(wire.Role.CHILD, max_frame_bytes=max_frame_bytes)
        self.methods: dict[str, Method] = build_registry(diagnostics=diagnostics)
        self.lock = threading.Lock()
        self.contexts: dict[int, CallContext] = {}
        """Calls acked and not yet finished (guarded by ``lock``)."""
        self.executing: set[int] = set()
        """Ids whose method is executing in a thread right now, cancelled or not (guarded by ``lock``)."""
        self.executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="bridge-call")
        self.draining = False
        self.started_at = time.monotonic()
        self.counters = {
            "calls": 0,
            "completed": 0,
            "failed": 0,
            "cancelled": 0,
            "discarded": 0,
            "lane_calls": 0,
            "lane_spilled": 0,
            "reliefs": 0,
        }
        self._batch: list[bytes] = []
        """Frames to write after this read (acks, pongs, inline results); guarded by ``lock``."""
        self._held: list[bytes] = []
        """Lane results held by the reader (see ``MAX_RESULT_HOLD_S``); guarded by ``lock``."""
        self._held_since = 0.0
        self._jobs: list[tuple[CallContext, Method]] = []
        """Calls for the thread pool, read and acked by the reader and submitted after its flush."""
        self._lane_new: list[tuple[CallContext, Method]] = []
        """Lane calls read and acked by the reader, moved onto the lane after its flush (so no thread
        can run one, and write its result, before its ack is written)."""
        self._poller = select.poll()
        self._poller.register(read_fd, select.POLLIN)
        # The CPU lane and the two threads' roles, all guarded by ``_roles``:
        self._roles = threading.Condition(threading.Lock())
        self._lane: collections.deque[tuple[CallContext, Method]] = collections.deque()
        """Lane calls waiting, in arrival order (bounded by the calls the parent may have in flight)."""
        self._reader: int | None = None
        """``threading.get_ident()`` of the thread that reads stdin (exactly one does)."""
        self._runner: int | None = None
        """The thread running lane calls, if any (at most one: the lane is serial)."""
        self._lane_busy = False
        """True while the runner is inside a lane call."""
        self._lane_ctx: CallContext | None = None
        """The lane call running now, if any."""
        self._lane_seq = 0
        """Lane calls started: the standby sees whether the runner made progress."""
        self._standby_parked = False
        self.state: dict[str, Any] = {}
        """Per-worker state owned by method modules (program cache, LM configuration)."""

    # -- output ---------------------------------------------------------------------------------------
    def _queue(self, message: wire.ChildMessage) -> None:
        """Reader thread only: add a frame to the batch flushed after this read."""
        with self.lock:
            self._batch.append(self.conn.send(message))

    def flush(self) -> None:
        """Write the reader's batch (acks, pongs, inline results) and held lane results in one write."""
        if self._batch or self._held:
            with self.lock:
                data = b"".join(self._held + self._batch)
                self._held.clear()
                self._batch.clear()
                self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self.write_fd, data)
        except OSError:
            _parent_gone()

    def write_raw(self, data: bytes) -> None:
        """Diagnostics: write bytes onto the frame stream itself, bypassing the codec."""
        with self.lock:
            self._write(data)

    def _emit(self, ctx: CallContext, data: Any) -> None:
        with self.lock:
            if ctx.finished or ctx.cancelled.is_set():
                return
            try:
                frame = self.conn.send(wire.Event(ctx.id, ctx.seq, data))
            except wire.UnencodableMessage as exc:
                raise MethodError(wire.ErrorCode.UNENCODABLE, str(exc), type="UnencodableMessage") from exc
            ctx.seq += 1
            self._write(frame)

    def _terminal(
        self, ctx: CallContext, message: wire.Result | wire.Error, *, batch: bool, hold: bool = False
    ) -> bool:
        """Send the one terminal frame of ``ctx`` (now, with the reader's batch, or ``hold``: with the
        reader's held lane results); False (and nothing sent) if it already had one."""
        with self.lock:
            if ctx.finished:
                self.counters["discarded"] += 1
                return False
            try:
                frame = self.conn.send(message)
            except wire.UnencodableMessage as exc:
                message = wire.Error(ctx.id, wire.ErrorCode.UNENCODABLE, "UnencodableMessage", str(exc))
                frame = self.conn.send(message)
            ctx.finished = True
            del self.contexts[ctx.id]
            if isinstance(message, wire.Result):
                self.counters["completed"] += 1
            elif message.code == wire.ErrorCode.CANCELLED:
                self.counters["cancelled"] += 1
            else:
                self.counters["failed"] += 1
            if hold:
                if not self._held:
                    self._held_since = time.monotonic()
                self._held.append(frame)
            elif batch:
                self._batch.append(frame)
            else:
                self._write(frame)
            return True

    # -- running calls --------------------------------------------------------------------------------
    def _outcome(self, ctx: CallContext, method: Method) -> wire.Result | wire.Error | None:
        """Run the method; its terminal message, or None when the call was cancelled before it started.

        Every exception becomes an error, ``BaseException`` included: a ``SystemExit`` raised by a
        program must fail its call, not end the thread (and leave the call without an outcome)."""
        if ctx.cancelled.is_set():
            return None
        with self.lock:
            self.executing.add(ctx.id)
        try:
            value = method.func(self, ctx)
        except MethodError as exc:
            return wire.Error(ctx.id, exc.code, exc.type or type(exc).__name__, exc.message, exc.details)
        except BaseException as exc:
            detail = "".join(traceback.format_exception_only(exc)).strip()
            return wire.Error(ctx.id, wire.ErrorCode.INTERNAL, type(exc).__name__, str(exc) or detail)
        finally:
            with self.lock:
                self.executing.discard(ctx.id)
        return wire.Result(ctx.id, value)

    def _run(self, ctx: CallContext, method: Method, *, batch: bool) -> None:
        outcome = self._outcome(ctx, method)
        if outcome is not None:
            self._terminal(ctx, outcome, batch=batch)

    def _on_lane(self, ctx: CallContext, method: Method) -> bool:
        if method.lane is None:
            return False
        try:
            return bool(method.lane(self, ctx))
        except Exception:  # bad params: the method itself reports them, wherever it runs
            return False

    def _on_call(self, call: wire.Call) -> None:
        self.counters["calls"] += 1
        method = self.methods.get(call.method)
        if method is None:
            self._queue(
                wire.Error(
                    call.id, wire.ErrorCode.UNKNOWN_METHOD, "UnknownMethod", f"no method {call.method!r}"
                )
            )
            return
        if self.draining:
            self._queue(
                wire.Error(call.id, wire.ErrorCode.SHUTTING_DOWN, "ShuttingDown", "worker is shutting down")
            )
            return
        ctx = CallContext(call, self._emit)
        with self.lock:
            self.contexts[call.id] = ctx
            self._batch.append(self.conn.send(wire.Ack(call.id)))
        if method.inline:
            if method.flush_first:
                self.flush()
            self._run(ctx, method, batch=True)
        elif self._on_lane(ctx, method):
            self.counters["lane_calls"] += 1
            self._lane_new.append((ctx, method))  # queued on the lane once its ack is written
        else:
            self._jobs.append((ctx, method))

    def _on_cancel(self, cancel: wire.Cancel) -> None:
        ctx = self.contexts.get(cancel.id)
        if ctx is None:
            return  # already finished: its terminal frame is on its way
        ctx.cancelled.set()
        self._terminal(
            ctx, wire.Error(ctx.id, wire.ErrorCode.CANCELLED, "Cancelled", "cancelled"), batch=True
        )

    def _on_shutdown(self, grace: float) -> None:
        if self.draining:
            return
        self.draining = True
        threading.Thread(
            target=self._drain_then_exit, args=(grace,), name="bridge-drain", daemon=True
        ).start()

    def _drain_then_exit(self, grace: float) -> None:
        deadline = time.monotonic() + max(0.0, grace)
        while time.monotonic() < deadline:
            with self.lock:
                if not self.contexts:
                    break
            time.sleep(0.005)
        with self.lock:  # held until the exit: no thread may send a result for a call cut off here
            for ctx in list(self.contexts.values()):
                ctx.cancelled.set()
                ctx.finished = True
            self._write_held()  # lane calls that finished: their acks are out, their results go too
            _kill_own_group_but_self()
            _exit_now(0)

    def dispatch(self, message: wire.ParentMessage) -> None:
        if isinstance(message, wire.Call):
            self._on_call(message)
        elif isinstance(message, wire.Ping):
            self._queue(wire.Pong(message.nonce))
        elif isinstance(message, wire.Cancel):
            self._on_cancel(message)
        elif isinstance(message, wire.Shutdown):
            self._on_shutdown(message.grace)

    # -- the loops ------------------------------------------------------------------------------------
    def hello(self) -> wire.Hello:
        return wire.Hello(
            version=wire.PROTOCOL_VERSION,
            pid=os.getpid(),
            capacity=self.capacity,
            capabilities=sorted(self.methods),
            versions=library_versions(),
        )

    def serve(self) -> NoReturn:
        """Run until stdin reaches EOF, a shutdown completes, or the parent breaks the protocol (every
        way out ends the process)."""
        start_watchdog(self.read_fd)
        self._queue(self.hello())
        self.flush()
        self._reader = threading.get_ident()
        threading.Thread(target=self._take_turns, name="bridge-relief", daemon=True).start()
        self._take_turns()
        raise AssertionError("unreachable")  # pragma: no cover

    def _take_turns(self) -> None:
        """The loop of both the main and the relief thread: read (and run lane calls) while this
        thread is the reader; once relieved, finish the lane's queue; then stand by."""
        me = threading.get_ident()
        while True:
            if self._reader == me:
                self._read_and_run(me)
            self._drain_lane(me)
            self._stand_by(me)

    def _read_once(self, *, block: bool) -> None:
        """Read what stdin has (waiting for it only if ``block``), dispatch it, write the replies (with
        any held lane results) and submit the pool's calls."""
        if block:
            self.flush()
        if block or self._poller.poll(0):
            try:
                data = os.read(self.read_fd, READ_CHUNK_BYTES)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                data = None
            if data is not None:
                if not data:
                    _parent_gone()  # stdin reached EOF: exit promptly, also while busy
                try:
                    self.conn.receive_data(data)
                    while (message := self.conn.next_event()) is not wire.NEED_DATA:
                        self.dispatch(message)  # type: ignore[arg-type]
                except wire.ProtocolError as exc:
                    print(f"bridge_child: protocol error from the parent: {exc}", file=sys.stderr)
                    _exit_now(EXIT_PROTOCOL_ERROR)
        self.flush()
        jobs, self._jobs = self._jobs, []
        if self._lane_new or self._lane_ctx is not None:
            with self._roles:
                self._lane.extend(self._lane_new)
                self._lane_new.clear()
                jobs.extend(self._spill_lane())
        for ctx, method in jobs:
            self.executor.submit(self._run, ctx, method, batch=False)

    def _spill_lane(self) -> list[tuple[CallContext, Method]]:
        """(``_roles`` held) The lane's queue, taken off the lane when its runner is stuck in a call
        that was cancelled (it ran past the relief, so another thread reads): a call that ignores its
        cancellation must not hold up the calls behind it. They run in the thread pool instead."""
        running = self._lane_ctx
        if running is None or not running.cancelled.is_set() or self._runner == self._reader:
            return []
        spilled = list(self._lane)
        self._lane.clear()
        with self.lock:
            self.counters["lane_spilled"] += len(spilled)
        return spilled

    def _read_and_run(self, me: int) -> None:
        """The reader's loop; returns when this thread was relieved (its lane call done).

        While the lane has calls the reader reads stdin only once its held results are due (see
        ``MAX_RESULT_HOLD_S``): the acks of the calls read then go out in the same write as those
        results, one wake-up of the parent for both."""
        while True:
            with self._roles:
                can_run = self._runner is None and bool(self._lane)
            if not can_run:
                self._read_once(block=True)
            elif self._held and time.monotonic() - self._held_since >= MAX_RESULT_HOLD_S:
                self._read_once(block=False)
            with self._roles:
                if self._runner is not None or not self._lane:
                    continue
                ctx, method = self._lane.popleft()
                self._start_lane_call(me, ctx)
            outcome = self._outcome(ctx, method)
            with self._roles:
                self._lane_busy = False
                self._lane_ctx = None
                relieved = self._reader != me
                if not relieved:
                    self._runner = None
            if outcome is not None:  # held by the reader; written now if another thread reads
                self._terminal(ctx, outcome, batch=False, hold=not relieved)
            if relieved:
                return

    def _start_lane_call(self, me: int, ctx: CallContext) -> None:
        """(``_roles`` held) This thread runs the lane call ``ctx``."""
        self._runner = me
        self._lane_busy = True
        self._lane_ctx = ctx
        self._lane_seq += 1
        if self._standby_parked:
            self._standby_parked = False
            self._roles.notify()

    def _drain_lane(self, me: int) -> None:
        """A relieved runner runs the lane's queue to the end, then lets the reader run it again."""
        while True:
            with self._roles:
                if self._runner != me:
                    return
                if not self._lane:
                    self._runner = None
                    return
                ctx, method = self._lane.popleft()
                self._start_lane_call(me, ctx)
            self._run(ctx, method, batch=False)
            with self._roles:
                self._lane_busy = False
                self._lane_ctx = None

    def _write_held_if_due(self) -> None:
        """Standby, while the reader runs a lane call: write the results it holds if they are due, so a
        long lane call does not hold back the results of the short ones before it for long."""
        with self.lock:
            if self._held and time.monotonic() - self._held_since >= MAX_RESULT_HOLD_S:
                self._write_held()

    def _write_held(self) -> None:
        """(``lock`` held) Write the held lane results now."""
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._write(data)

    def _reader_in_lane_call(self) -> bool:
        """(``_roles`` held) The reader is inside a lane call, so nobody reads stdin."""
        return self._lane_busy and self._runner == self._reader

    def _stand_by(self, me: int) -> None:
        """Wait until the reader has been inside one lane call for ``RELIEF_AFTER_S``, then take over
        reading. Sleeps without waking once the lane has been idle for ``STANDBY_PARK_AFTER_S``."""
        idle_since: float | None = None
        with self._roles:
            while True:
                if self._reader_in_lane_call():
                    idle_since = None
                    seq = self._lane_seq
                    self._roles.wait(RELIEF_AFTER_S)
                    if self._reader_in_lane_call() and self._lane_seq == seq:
                        self._reader = me
                        with self.lock:
                            self.counters["reliefs"] += 1
                        return  # the new reader writes what is held before it blocks
                    if self._reader_in_lane_call():
                        self._write_held_if_due()
                    continue
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                if now - idle_since < STANDBY_PARK_AFTER_S:
                    self._roles.wait(RELIEF_AFTER_S)
                    continue
                self._standby_parked = True
                while self._standby_parked:
                    self._roles.wait()
                idle_since = None


def start_watchdog(read_fd: int) -> None:
    """Exit when stdin hangs up (every writer closed: the parent is gone), whatever the reader does."""

    def watch() -> None:
        poller = select.poll()
        poller.register(read_fd, 0)  # POLLHUP and POLLERR are always reported
        while True:
            for _fd, events in poller.poll():
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    _parent_gone()

    threading.Thread(target=watch, name="bridge-watchdog", daemon=True).start()


def library_versions() -> dict[str, str]:
    import msgspec

    versions = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "bridge_child": __version__,
        "msgspec": msgspec.__version__,
    }
    dspy = sys.modules.get("dspy")
    if dspy is not None:
        versions["dspy"] = getattr(dspy, "__version__", "?")
    return versions


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bridge_child", description="A dspex-trio worker on stdio."
    )
    parser.add_argument("--capacity", type=int, default=DEFAULT_CAPACITY, help="calls run at once (threads)")
    parser.add_argument("--diagnostics", action="store_true", help="enable the diagnostic methods")
    parser.add_argument("--worker-id", default="", help="the runtime's name for this worker (for logs)")
    parser.add_argument("--max-frame-bytes", type=int, default=wire.DEFAULT_MAX_FRAME_BYTES)
    parser.add_argument("--preload", action="store_true", help="import dspy before the hello")
    parser.add_argument(
        "--fail-at-start",
        type=int,
        default=None,
        metavar="CODE",
        help="diagnostics: exit with CODE before hello",
    )
    args = parser.parse_args(argv)
    if args.capacity < 1:
        parser.error("--capacity must be at least 1")
    return args


def prepare_process() -> None:
    """Signal dispositions for a worker: the parent controls shutdown, so Ctrl-C in a terminal (SIGINT
    to the foreground group) is ignored; SIGTERM keeps its default action (exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")


def run_worker(args: argparse.Namespace, read_fd: int, write_fd: int) -> int:
    if args.fail_at_start is not None:
        if not args.diagnostics:
            print("bridge_child: --fail-at-start needs --diagnostics", file=sys.stderr)
            return 2
        print(f"bridge_child: failing at start with exit code {args.fail_at_start}", file=sys.stderr)
        _exit_now(args.fail_at_start)
    if args.preload:
        from bridge_child import _programs

        _programs.preload()
    worker = Worker(
        read_fd,
        write_fd,
        capacity=args.capacity,
        diagnostics=args.diagnostics,
        worker_id=args.worker_id,
        max_frame_bytes=args.max_frame_bytes,
    )
    return worker.serve()


def main(argv: list[str], *, read_fd: int, write_fd: int) -> int:
    args = parse_args(argv)
    prepare_process()
    return run_worker(args, read_fd, write_fd)
