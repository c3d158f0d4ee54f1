"""The worker: a blocking reader thread that acks every call and runs the CPU-bound ones itself (the CPU
lane, ``_lane``), and a thread pool that runs the rest.

Why not a Trio event loop in the child: see docs/worker.md. In short, a blocking reader answers a no-op
call in one ``os.read`` + one ``os.write`` with no event-loop hop, ~50 µs faster per round trip here,
and the work itself (DSPy calls) is blocking code that must run in threads either way.

Threads:
- the *reader* reads frames from stdin, acks each call before any work on it, answers pings and
  cancels (at once when idle; while it runs lane calls, within ~3 ms plus the lane call running),
  runs the few *inline* methods (cheap, non-blocking) itself, runs the calls of the *CPU lane*
  itself (one at a time, see ``_lane``), and hands the rest to
- a ``ThreadPoolExecutor`` of ``capacity`` threads (calls beyond it are acked and wait their turn);
- a *relief* thread, on standby: when a lane call has kept the reader busy for ``RELIEF_AFTER_S`` it
  becomes the reader (``_lane``);
- a watchdog thread blocked in ``poll()`` for a hang-up on stdin: when the parent is gone the worker
  exits, even if the reader is stuck (the ``hang`` diagnostic) or every thread is busy.
All frame writes go through one lock, which also guards the connection's state and each call's
"finished" flag, so every call gets exactly one terminal frame.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, NoReturn

from bridge_child import __version__, _inflight, wire
from bridge_child._aio import AioLane
from bridge_child._context import CallContext, Method, MethodError
from bridge_child._lane import MAX_RESULT_HOLD_S, CpuLane, Job
from bridge_child._leases import Leases
from bridge_child._methods import build_registry

READ_CHUNK_BYTES: Final = 256 * 1024
"""Most bytes taken from stdin per read."""
DEFAULT_CAPACITY: Final = 64
"""Calls a worker runs at once (threads); I/O-bound LM calls mostly wait, so this is generous."""
EXIT_PROTOCOL_ERROR: Final = 3
"""Exit code when the parent sent something the protocol does not allow."""
EXIT_STARTUP_FAILURE: Final = 4
"""Exit code for a worker told to fail at start (diagnostics) or unable to start."""


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
        lease_lms: bool = False,
        async_capacity: int = 0,
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
            "timed_out": 0,
            "discarded": 0,
            "lane_calls": 0,
            "lane_spilled": 0,
            "reliefs": 0,
            "aio_calls": 0,
        }
        self._batch: list[bytes] = []
        """Frames to write after this read (acks, pongs, inline results); guarded by ``lock``."""
        self._held: list[bytes] = []
        """Lane results held by the reader (see ``MAX_RESULT_HOLD_S``); guarded by ``lock``."""
        self._held_since = 0.0
        self._jobs: list[Job] = []
        """Calls for the thread pool, read and acked by the reader and submitted after its flush."""
        self._lane_new: list[Job] = []
        """Lane calls read and acked by the reader, moved onto the lane after its flush (so no thread
        can run one, and write its result, before its ack is written)."""
        self._poller = select.poll()
        self._poller.register(read_fd, select.POLLIN)
        self.lane = CpuLane(self)
        self.state: dict[str, Any] = {}
        """Per-worker state owned by method modules (program cache, LM configuration)."""
        self.leases: Leases | None = Leases(self.send_now) if lease_lms else None
        """Asks the host before each LM request (``--lease-lms``: the pool has LM budgets)."""
        self.aio: AioLane | None = AioLane(self, async_capacity) if async_capacity > 0 else None
        """The asynchronous lane (``--async-capacity``): executions with a network LM, no thread each."""
        self._aio_new: list[Job] = []
        self._aio_cancels: list[int] = []

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

    def send_now(self, message: wire.ChildMessage) -> None:
        """Any thread: write one frame now (a lease's request or release)."""
        with self.lock:
            self._write(self.conn.send(message))

    def write_raw(self, data: bytes) -> None:
        """Diagnostics: write bytes onto the frame stream itself, bypassing the codec."""
        with self.lock:
            self._write(data)

    def _emit(self, ctx: CallContext, data: Any) -> None:
        with self.lock:
            if ctx.finished or ctx.is_cancelled():
                return
            try:
                frame = self.conn.send(wire.Event(ctx.id, ctx.seq, data))
            except wire.UnencodableMessage as exc:
                raise MethodError(wire.ErrorCode.UNENCODABLE, str(exc), type="UnencodableMessage") from exc
            ctx.seq += 1
            self._write(frame)

    def terminal(
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
            elif message.code == wire.ErrorCode.TIMEOUT:  # stopped at the deadline the call carried
                self.counters["timed_out"] += 1
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
    def outcome(self, ctx: CallContext, method: Method) -> wire.Result | wire.Error | None:
        """Run the method; its terminal message, or None when the call was cancelled before it started.

        Every exception becomes an error, ``BaseException`` included: a ``SystemExit`` raised by a
        program must fail its call, not end the thread (and leave the call without an outcome)."""
        if ctx.finished or ctx.is_cancelled():  # cancelled before it started
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

    def run(self, ctx: CallContext, method: Method, *, batch: bool) -> None:
        outcome = self.outcome(ctx, method)
        if outcome is not None:
            self.terminal(ctx, outcome, batch=batch)

    def _on_aio(self, ctx: CallContext, method: Method) -> bool:
        if method.aio is None or method.on_aio is None:
            return False
        try:
            return bool(method.on_aio(self, ctx))
        except Exception:  # bad params: the method itself reports them, wherever it runs
            return False

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
            self.run(ctx, method, batch=True)
        elif self._on_lane(ctx, method):
            self.counters["lane_calls"] += 1
            self._lane_new.append((ctx, method))  # queued on the lane once its ack is written
        elif self.aio is not None and self._on_aio(ctx, method):
            self.counters["aio_calls"] += 1
            self.aio.adopt(ctx.id)
            self._aio_new.append((ctx, method))  # started on the loop once its ack is written
        else:
            self._jobs.append((ctx, method))

    def _on_cancel(self, cancel: wire.Cancel) -> None:
        ctx = self.contexts.get(cancel.id)
        if ctx is None:
            return  # already finished: its terminal frame is on its way
        # Its one terminal frame first, then the cancel that wakes its thread: a method woken by it
        # (``sleep`` returning, an LM read failing on its closed connection) must not answer first,
        # with a result or an error, for a call its caller cancelled (what it sends is discarded).
        self.terminal(ctx, wire.Error(ctx.id, wire.ErrorCode.CANCELLED, "Cancelled", "cancelled"), batch=True)
        ctx.cancelled.set()
        if self.aio is not None and self.aio.holds(ctx.id):
            # An asynchronous execution: its loop closes its connections and cancels its task, with
            # all of this read's at once (``AioLane.cancel_many``).
            self._aio_cancels.append(ctx.id)
        else:  # its LM requests' connections close: the provider stops generating
            _inflight.abort(ctx.id)
        if self.leases is not None:
            self.leases.on_cancel(ctx.id)

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
        elif isinstance(message, wire.LeaseGrant) and self.leases is not None:
            self.leases.on_grant(message)

    # -- the loops ------------------------------------------------------------------------------------
    def hello(self) -> wire.Hello:
        return wire.Hello(
            version=wire.PROTOCOL_VERSION,
            pid=os.getpid(),
            capacity=self.capacity + (self.aio.capacity if self.aio is not None else 0),
            capabilities=sorted(self.methods),
            versions=library_versions(),
        )

    def serve(self) -> NoReturn:
        """Run until stdin reaches EOF, a shutdown completes, or the parent breaks the protocol (every
        way out ends the process)."""
        start_watchdog(self.read_fd)
        self._queue(self.hello())
        self.flush()
        self.lane.reader = threading.get_ident()
        threading.Thread(target=self.lane.take_turns, name="bridge-relief", daemon=True).start()
        self.lane.take_turns()

    def read_once(self, *, block: bool) -> None:
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
                    while True:
                        # Under the send lock: threads send lease frames, and a lease's answer and its
                        # release move the same entry of the connection's lease table.
                        with self.lock:
                            message = self.conn.next_event()
                        if message is wire.NEED_DATA:
                            break
                        self.dispatch(message)  # type: ignore[arg-type]
                    if self._aio_cancels:
                        assert self.aio is not None
                        self.aio.cancel_many(self._aio_cancels)
                        self._aio_cancels = []
                except wire.ProtocolError as exc:
                    print(f"bridge_child: protocol error from the parent: {exc}", file=sys.stderr)
                    _exit_now(EXIT_PROTOCOL_ERROR)
        self.flush()
        if self._aio_new:
            assert self.aio is not None
            for ctx, method in self._aio_new:
                self.aio.submit(ctx, method)
            self._aio_new.clear()
        jobs, self._jobs = self._jobs, []
        if self._lane_new or self.lane.current is not None:
            jobs.extend(self.lane.admit(self._lane_new))
        for ctx, method in jobs:
            self.executor.submit(self.run, ctx, method, batch=False)

    def held_due(self) -> bool:
        """Lane results are held, and the oldest has waited ``MAX_RESULT_HOLD_S``."""
        return bool(self._held) and time.monotonic() - self._held_since >= MAX_RESULT_HOLD_S

    def write_held_if_due(self) -> None:
        """Standby, while the reader runs a lane call: write the results it holds if they are due, so a
        long lane call does not hold back the results of the short ones before it for long."""
        with self.lock:
            if self.held_due():
                self._write_held()

    def _write_held(self) -> None:
        """(``lock`` held) Write the held lane results now."""
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._write(data)

    def count(self, counter: str, n: int) -> None:
        with self.lock:
            self.counters[counter] += n


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
        "--lease-lms", action="store_true", help="ask the host for a lease before each LM request"
    )
    parser.add_argument(
        "--async-capacity",
        type=int,
        default=0,
        help="executions with a network LM run on an event loop, up to this many besides the threads",
    )
    parser.add_argument(
        "--lm-cache-entries", type=int, default=0, help="LM answers cached in memory (0: no LM cache)"
    )
    parser.add_argument("--lm-cache-dir", default=None, help="a disk LM cache shared by the pool's workers")
    parser.add_argument("--lm-cache-disk-bytes", type=int, default=None, help="the disk LM cache's cap")
    parser.add_argument("--lm-cache-mode", default="read_write", help="read_write, read_only or off")
    parser.add_argument(
        "--programs", default="", help="program modules to import before the hello, comma-separated"
    )
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
    if args.programs:  # forked by the zygote: already imported there, this only makes them current
        from bridge_child import _programs, registry

        _programs._import_dspy()  # as the zygote's preload does (nothing to do in a forked worker)
        try:
            registry.activate([name for name in args.programs.split(",") if name])
        except (registry.RegistryError, ValueError) as exc:
            print(f"{registry.FAILED_PREFIX}{exc}", file=sys.stderr)
            _exit_now(registry.EXIT_PROGRAMS)
    if args.lm_cache_entries > 0:  # after the fork: a disk cache opens SQLite files
        from bridge_child import _lmcache, _programs

        _programs._import_dspy()
        _lmcache.configure(
            args.lm_cache_entries, args.lm_cache_dir, args.lm_cache_disk_bytes, args.lm_cache_mode
        )
    worker = Worker(
        read_fd,
        write_fd,
        capacity=args.capacity,
        diagnostics=args.diagnostics,
        worker_id=args.worker_id,
        max_frame_bytes=args.max_frame_bytes,
        lease_lms=args.lease_lms,
        async_capacity=max(0, args.async_capacity),
    )
    return worker.serve()


def main(argv: list[str], *, read_fd: int, write_fd: int) -> int:
    args = parse_args(argv)
    prepare_process()
    return run_worker(args, read_fd, write_fd)
