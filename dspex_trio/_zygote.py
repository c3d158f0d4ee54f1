"""The zygote launcher: workers forked from a template process that imported dspy and trio once.

``open_zygote()`` starts the template (``python -m bridge_child._zygote``, see that module for the
control protocol) in its own process group, owned by the caller's nursery like every other process of
the runtime, and yields a :class:`ZygoteLauncher`. ``launch()`` makes the worker's three pipes here,
hands the child ends to the template over a Unix socket (``SCM_RIGHTS``), and gets back the pid of the
forked worker: a worker ready in a few milliseconds instead of a cold ``import dspy`` (~0.6 s), sharing
the template's imported pages.

The workers are the template's children, not ours: the template reaps them and reports each exit status
on the control socket, which :meth:`ZygoteWorker.wait` waits for. If the template dies, running workers
keep serving (their pipes are ours); their exits are then seen through a pidfd opened when they were
spawned, with the status unknown (``ExitStatus(code=None, signal=None)``). Launches on a dead template
raise :class:`ZygoteError` (an ``OSError``, so ``start_worker`` reports ``WorkerStartFailed``), and
``alive`` turns False: the owner restarts the zygote or falls back to the subprocess launcher (the
pool's owner is ``_pool_launcher.SupervisedZygote``).
"""

from __future__ import annotations

import array
import errno
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from dspex_trio._errors import ExitStatus, ProgramModuleError
from dspex_trio._launcher import (
    Launcher,
    WorkerProcess,
    WorkerSpec,
    signal_group,
    worker_environment,
)
from dspex_trio._stderr import StderrRelay
from dspex_trio._util import open_service_nursery

logger = logging.getLogger("dspex_trio.zygote")

MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest control message (the template's limit too)."""
DEFAULT_START_TIMEOUT_S: Final = 30.0
"""From starting the template to its ``ready`` (it imports dspy: ~0.6 s idle, more on a busy machine)."""
DEFAULT_SPAWN_TIMEOUT_S: Final = 10.0
"""From a spawn request to the template's reply (a fork takes milliseconds); past it the template is
considered wedged and killed."""
TEMPLATE_EXIT_GRACE_S: Final = 2.0
"""On close: how long the template may take to exit after its control socket is shut down."""
KILL_WAIT_S: Final = 5.0
"""On close: how long to wait for SIGKILLed processes (left-over workers, the template) to be reaped."""
ORPHAN_POLL_S: Final = 0.05
"""Polling period to detect a worker's exit when no pidfd could be opened for it (and no template
is left to report it)."""

_CHILD_MODULE: Final = "bridge_child._zygote"
_PEER_GONE: Final = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})


class ZygoteError(OSError):
    """The zygote cannot start a worker: it is not running, it died, or it refused the request."""


def zygote_supported() -> bool:
    """Whether this platform can run the zygote (Linux: ``fork``, ``pipe2``, ``SOCK_SEQPACKET``,
    ``SCM_RIGHTS``). Whether a given interpreter can is only known by trying :func:`open_zygote`."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "fork")
        and hasattr(os, "pipe2")
        and hasattr(socket, "SOCK_SEQPACKET")
        and hasattr(socket, "send_fds")
    )


@attrs.define(eq=False)
class _Spawn:
    """One spawn request in flight."""

    worker: ZygoteWorker
    done: trio.Event = attrs.Factory(trio.Event)
    error: str | None = None
    abandoned: bool = False


@attrs.define(eq=False)
class ZygoteWorker:
    """A worker forked by the zygote (implements ``WorkerProcess``)."""

    _launcher: ZygoteLauncher
    _stdin: trio.lowlevel.FdStream
    _frames: trio.lowlevel.FdStream
    _stderr: trio.lowlevel.FdStream
    _pid: int = 0
    _pidfd: int = -1
    """Opened when the spawn reply arrives: how its exit is seen once no template is left to report it.
    (Had the template already reaped it, its pid possibly reused, its exit report is already queued
    behind the reply and is read before the control socket's EOF: this pidfd then goes unused.)"""
    _status: ExitStatus | None = None
    _wake: trio.Event = attrs.Factory(trio.Event)
    """Set when the exit status arrived, or when no report will ever come (the template is gone)."""
    _orphan_wait: trio.Lock = attrs.Factory(trio.Lock)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stdin(self) -> trio.abc.SendStream:
        return self._stdin

    @property
    def frames(self) -> trio.abc.ReceiveStream:
        return self._frames

    @property
    def stderr(self) -> trio.abc.ReceiveStream:
        return self._stderr

    def exit_status(self) -> ExitStatus | None:
        return self._status

    async def wait(self) -> ExitStatus:
        await self._wake.wait()
        if self._status is None:  # the template died first: no report will come
            async with self._orphan_wait:  # one task waits on the pidfd, the others on the lock
                if self._status is None:
                    await self._wait_gone()
                    self._set_status(ExitStatus(code=None, signal=None))
        assert self._status is not None
        return self._status

    def signal_group(self, signum: int) -> None:
        if self._pid > 0:
            signal_group(self._pid, signum)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for stream in (self._stdin, self._frames, self._stderr):
                await stream.aclose()

    # -- the launcher's side ----------------------------------------------------------------------------
    def _close_streams(self) -> None:
        for stream in (self._stdin, self._frames, self._stderr):
            stream.close()

    def _set_status(self, status: ExitStatus) -> None:
        if self._status is None:
            self._status = status
        self._close_pidfd()
        self._launcher._live.discard(self)
        self._wake.set()

    def _orphan(self) -> None:
        self._wake.set()

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            fd, self._pidfd = self._pidfd, -1
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def _wait_gone(self) -> None:
        """Wait until the process has exited (a zombie counts: nobody we know will reap it)."""
        if self._pidfd >= 0:
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
                return
            except trio.ClosedResourceError:
                pass
        while not _process_gone(self._pid):  # noqa: ASYNC110 - no event to wait for: poll /proc
            await trio.sleep(ORPHAN_POLL_S)


@attrs.define(eq=False)
class ZygoteLauncher:
    """Forks workers from a running template process. Made by :func:`open_zygote`."""

    process: trio.Process
    _sock: trio.socket.SocketType
    spawn_timeout: float = DEFAULT_SPAWN_TIMEOUT_S
    name: str = "zygote"
    info: dict[str, Any] = attrs.Factory(dict)
    """The template's ``ready`` message: its pid, library versions, how long its preload took."""
    death_reason: str | None = None
    """Why the template stopped (None while it runs)."""
    programs_failure: str | None = None
    """Why the operator's program modules cannot be used, when the template said so instead of ready."""
    launched: int = 0
    """Workers forked so far."""
    _alive: bool = False
    _closing: bool = False
    _ready: trio.Event = attrs.Factory(trio.Event)
    _started_or_dead: trio.Event = attrs.Factory(trio.Event)
    _dead: trio.Event = attrs.Factory(trio.Event)
    _reader_done: trio.Event = attrs.Factory(trio.Event)
    _tasks_scope: trio.CancelScope = attrs.Factory(lambda: trio.CancelScope(shield=True))
    """The background tasks are shielded: an outside cancellation must not stop the control reader
    before ``_shutdown`` used it (to see the exit of the workers it kills). Cancelled after it."""
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    _pending: dict[int, _Spawn] = attrs.Factory(dict)
    _workers: dict[int, ZygoteWorker] = attrs.Factory(dict)
    """Forked workers whose exit report is awaited, by pid."""
    _live: set[ZygoteWorker] = attrs.Factory(set)
    """Forked workers whose exit has not been seen yet (reported or, once orphaned, through a pidfd)."""
    _stderr: StderrRelay = attrs.Factory(lambda: StderrRelay("zygote", logger))
    """Re-logs the template's stderr (``[zygote] ...``) and keeps its last lines, quoted in errors."""

    @property
    def pid(self) -> int:
        """The template's pid."""
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True while the template runs and takes spawn requests."""
        return self._alive

    @property
    def running_workers(self) -> int:
        """Workers forked by this template whose exit has not been seen yet."""
        return len(self._live)

    async def wait_dead(self) -> None:
        """Return once the template stopped taking requests (it died, or is being closed)."""
        await self._dead.wait()

    async def wait_idle(self) -> None:
        """Return once every worker this template forked has exited (and its exit was seen)."""
        while self._live:
            await next(iter(self._live)).wait()

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        """Fork a worker for ``spec``. Raises :class:`ZygoteError` if the template cannot do it."""
        if not self._alive:
            raise ZygoteError(errno.ECHILD, f"the zygote is not running: {self.death_reason or 'not ready'}")
        child_fds: list[int] = []
        parent_fds: list[int] = []
        try:
            for _ in range(3):
                r, w = os.pipe2(os.O_CLOEXEC)
                parent_fds.append(r)
                child_fds.append(w)
            # (stdin: the child reads, we write), (frames: we read), (stderr: we read)
            child_fds[0], parent_fds[0] = parent_fds[0], child_fds[0]
            stdin, frames, stderr = (trio.lowlevel.FdStream(fd) for fd in parent_fds)
        except BaseException:
            for fd in child_fds + parent_fds:
                os.close(fd)
            raise
        worker = ZygoteWorker(self, stdin, frames, stderr)
        request_id = next(self._ids)
        spawn = _Spawn(worker)
        payload = json.dumps({"op": "spawn", "id": request_id, "argv": spec.argv()}).encode()
        try:
            with trio.move_on_after(self.spawn_timeout):
                try:
                    self._pending[request_id] = spawn
                    await self._sock.sendmsg(
                        [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", child_fds))]
                    )
                except (OSError, trio.ClosedResourceError) as exc:
                    self._pending.pop(request_id, None)
                    if isinstance(exc, OSError) and exc.errno not in _PEER_GONE:
                        raise ZygoteError(exc.errno, f"cannot send a spawn request: {exc}") from exc
                    self._mark_dead(f"its control socket failed ({exc})")  # before the watchers notice
                    raise ZygoteError(errno.EPIPE, f"cannot reach the zygote: {self.death_reason}") from None
                finally:
                    for fd in child_fds:  # in flight now (or never sent): the template has its own copies
                        os.close(fd)
                await spawn.done.wait()
            if not spawn.done.is_set():
                self._fail(f"no reply to a spawn request within {self.spawn_timeout} s")
                raise ZygoteError(errno.ETIMEDOUT, f"the zygote did not fork {spec.worker_id} in time")
            if spawn.error is not None:
                raise ZygoteError(errno.EAGAIN, f"the zygote could not fork {spec.worker_id}: {spawn.error}")
        except BaseException:
            self._abandon(request_id, spawn)
            raise
        self.launched += 1
        return worker

    # -- internals --------------------------------------------------------------------------------------
    def _abandon(self, request_id: int, spawn: _Spawn) -> None:
        """``launch`` gives up: close our pipe ends (the worker sees EOF) and kill the worker if forked."""
        spawn.abandoned = True
        if spawn.done.is_set():
            self._pending.pop(request_id, None)
        spawn.worker._close_streams()
        spawn.worker.signal_group(signal.SIGKILL)

    def _mark_dead(self, reason: str) -> None:
        """The template takes no more requests; pending ones fail."""
        self._started_or_dead.set()
        if self._dead.is_set():
            return
        self._alive = False
        self.death_reason = reason
        if not self._closing and self.programs_failure is None:  # that one is raised, not logged
            logger.warning("zygote (pid %d): %s", self.pid, reason)
        for spawn in self._pending.values():
            if not spawn.done.is_set():
                spawn.error = f"the zygote stopped: {reason}"
                spawn.done.set()
        self._dead.set()

    def _fail(self, reason: str) -> None:
        """The template misbehaved: stop using it and kill it."""
        self._mark_dead(reason)
        signal_group(self.pid, signal.SIGKILL)

    def _orphan_all(self) -> None:
        """No more exit reports can come: the running workers' exits are seen through their pidfds."""
        for worker in self._workers.values():
            worker._orphan()
        self._workers.clear()

    def _route(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "exit":
            worker = self._workers.pop(message["pid"], None)
            if worker is not None:
                worker._set_status(ExitStatus(code=message["code"], signal=message["signal"]))
        elif op in ("spawned", "error"):
            spawn = self._pending.pop(message["id"], None)
            if spawn is None:
                return
            if op == "error":
                spawn.error = str(message.get("message"))
            else:
                worker = spawn.worker
                worker._pid = pid = int(message["pid"])
                try:
                    worker._pidfd = os.pidfd_open(pid)
                except (AttributeError, OSError):  # old kernel: polling /proc is the fallback
                    worker._pidfd = -1
                self._workers[pid] = worker
                self._live.add(worker)
                if spawn.abandoned:
                    signal_group(pid, signal.SIGKILL)
            spawn.done.set()
        elif op == "failed":  # its program modules cannot be used; it exits
            self.programs_failure = str(message.get("message"))
            self._mark_dead("its program modules cannot be used")
        elif op == "ready":
            self.info = message
            self._alive = not self._closing
            self._ready.set()
            self._started_or_dead.set()
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _background(self) -> None:
        with self._tasks_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_control)
                nursery.start_soon(self._watch_process)
                assert self.process.stderr is not None
                nursery.start_soon(self._stderr.run, self.process.stderr)

    async def _read_control(self) -> None:
        reason = "its control socket closed"
        try:
            while True:
                try:
                    data = await self._sock.recv(MAX_MESSAGE_BYTES)
                except (OSError, trio.ClosedResourceError) as exc:
                    reason = f"its control socket failed ({exc})"
                    break
                if not data:
                    # EOF: the template is exiting (or its socket broke); say how it ended if it did
                    with trio.move_on_after(0.5):
                        await self.process.wait()
                    if self.process.returncode is not None:
                        reason = _exit_reason(self.process.returncode)
                    break
                try:
                    self._route(json.loads(data))
                except (ValueError, KeyError, TypeError) as exc:
                    self._fail(f"unreadable control message {data[:200]!r} ({exc!r})")
                    continue
        finally:
            self._reader_done.set()
            self._mark_dead(reason)
            self._orphan_all()

    async def _watch_process(self) -> None:
        self._mark_dead(_exit_reason(await self.process.wait()))
        # Reports still queued in the socket are read first; then nothing more can come.
        with trio.move_on_after(1.0):
            await self._reader_done.wait()
        self._orphan_all()

    async def _wait_ready(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._started_or_dead.wait()
        if self._ready.is_set() and self._alive:
            return
        if self.programs_failure is not None:
            raise ProgramModuleError(self.programs_failure)
        if not self._dead.is_set():
            self._fail(f"not ready within {timeout} s")
        with trio.move_on_after(1.0):  # its last words
            await self._stderr.done.wait()
        tail = "\n".join(self._stderr.tail)
        raise ZygoteError(
            errno.ECHILD,
            f"the zygote (pid {self.pid}) failed to start: {self.death_reason}"
            + (f"\n--- its stderr ---\n{tail}" if tail else ""),
        )

    async def _shutdown(self) -> None:
        """Stop taking requests, kill workers still running (they should have been closed by their
        owners first), let the template exit, and reap it. Shielded and bounded."""
        with trio.CancelScope(shield=True):
            self._closing = True
            self._mark_dead("the zygote was closed")
            if self._live:
                logger.warning("zygote closed with %d worker(s) still running: killing them", len(self._live))
                for worker in list(self._live):
                    worker.signal_group(signal.SIGKILL)
                with trio.move_on_after(KILL_WAIT_S):  # the template reaps them and reports it
                    for worker in list(self._workers.values()):
                        await worker._wake.wait()
            try:
                self._sock.shutdown(socket.SHUT_WR)  # EOF: the template exits at once
            except OSError:
                pass
            with trio.move_on_after(TEMPLATE_EXIT_GRACE_S):
                await self.process.wait()
            if self.process.returncode is None:
                logger.warning("zygote (pid %d) did not exit on EOF: SIGKILL", self.pid)
                signal_group(self.pid, signal.SIGKILL)
                with trio.move_on_after(KILL_WAIT_S):
                    await self.process.wait()
                if self.process.returncode is None:
                    logger.error("zygote (pid %d) not reaped after SIGKILL", self.pid)
            signal_group(self.pid, signal.SIGKILL)  # anything left in its process group
            with trio.move_on_after(1.0):
                await self._reader_done.wait()

    def _release(self) -> None:
        """Close our fds (after the tasks that use them are gone)."""
        self._sock.close()
        if self.process.stderr is not None:
            stderr = self.process.stderr
            assert isinstance(stderr, trio.lowlevel.FdStream)
            stderr.close()
        self._orphan_all()
        for worker in list(self._live):  # their exits, if anyone still waits, are polled in /proc
            worker._close_pidfd()


def _exit_reason(returncode: int) -> str:
    return f"the template exited ({ExitStatus.from_returncode(returncode).describe()})"


def _process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


@asynccontextmanager
async def open_zygote(
    *,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    worker_env: Sequence[str] = (),
    programs: Sequence[str] = (),
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
    spawn_timeout: float = DEFAULT_SPAWN_TIMEOUT_S,
    on_spawned: Callable[[], object] | None = None,
) -> AsyncIterator[ZygoteLauncher]:
    """Start a zygote template process, owned by this context, and yield its launcher once it is ready.

    ``python`` must have ``bridge_child`` (and dspy) importable. The template's environment, which
    every worker it forks inherits, is ``worker_environment(os.environ, worker_env, env)``: the
    allow-list, the variables named by ``worker_env``, ``WORKER_ENV``, then the explicit ``env``
    values (see ``dspex_trio._launcher``). Leaving the block kills the workers it forked
    that are still running (their owners should have closed them first), makes the template exit, and
    reaps it: nothing is left behind.

    ``programs`` (the operator's program modules) are imported by the template before it forks.
    ``on_spawned`` is called once the template process runs (before it is ready).

    Raises:
        ZygoteError: the platform cannot fork workers, or the template failed to start in time.
        ProgramModuleError: a program module cannot be used (the template said why, naming it).
    """
    if not zygote_supported():
        raise ZygoteError(errno.ENOTSUP, f"the zygote launcher is not supported on {sys.platform}")
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            process = await trio.lowlevel.open_process(
                [
                    python,
                    "-m",
                    _CHILD_MODULE,
                    "--control-fd",
                    str(child_sock.fileno()),
                    *_programs_args(programs),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(child_sock.fileno(),),
                start_new_session=True,  # own process group; each worker gets its own too
                env=worker_environment(os.environ, worker_env, env),
            )
        finally:
            child_sock.close()
    except BaseException as exc:
        parent_sock.close()
        if isinstance(exc, OSError):
            raise ZygoteError(exc.errno or errno.ENOEXEC, f"cannot start the zygote: {exc}") from exc
        raise
    launcher = ZygoteLauncher(process, trio.socket.from_stdlib_socket(parent_sock), spawn_timeout)
    if on_spawned is not None:
        on_spawned()
    try:
        async with open_service_nursery() as nursery:
            nursery.start_soon(launcher._background)
            try:
                await launcher._wait_ready(start_timeout)
                logger.debug("zygote (pid %d) ready: %s", launcher.pid, launcher.info)
                yield launcher
            finally:
                try:
                    await launcher._shutdown()
                finally:
                    launcher._tasks_scope.cancel()
    finally:
        launcher._release()


def _programs_args(programs: Sequence[str]) -> list[str]:
    return ["--programs", ",".join(programs)] if programs else []


if TYPE_CHECKING:

    def _implements(launcher: ZygoteLauncher, worker: ZygoteWorker) -> tuple[Launcher, WorkerProcess]:
        return launcher, worker  # mypy checks the protocols here
