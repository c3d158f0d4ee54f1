"""Warm zygote templates for a whole test run, shared by the tests' pools across their Trio runs.

pytest-trio runs each test in its own ``trio.run``; a template (``dspex_trio.open_launcher``) is owned by
one Trio run. So the plugin keeps the templates in a run of their own, in a daemon thread
(:class:`TemplateHost`): one template per set of needs (interpreter, ``worker_env`` names, program
modules), started on first use and ended when the test session finishes (``close``, from
``pytest_sessionfinish``, and an ``atexit`` hook as a second line). A test's pool gets a
:class:`HostedLauncher`, which asks the host's run for a fresh worker forked from the template and
hands the test's run the worker's pipes (duplicated fds); the worker's exit is seen through a pidfd in
the test's run, its status then read from the template's report.

No orphans, whatever happens: the templates' control sockets and the workers' stdin pipes are held by
this process, so if it dies, every template and worker sees EOF and exits (as for any zygote). Each
test still gets fresh workers, fresh sessions and its leak checks: only the template is shared (the
template is a child of this process started before the test, so the leak check does not count it).
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Final

import attrs
import trio

from dspex_trio._errors import ExitStatus
from dspex_trio._launcher import WorkerProcess, WorkerSpec, signal_group
from dspex_trio._shared_launcher import (
    EventSink,
    LauncherNeeds,
    SharedLauncher,
    check_needs,
    open_launcher,
)
from dspex_trio._zygote import ZygoteError, ZygoteWorker

HOST_START_TIMEOUT_S: Final = 10.0
"""Bound on starting the host thread's Trio run, in s."""
HOST_STOP_TIMEOUT_S: Final = 15.0
"""Bound on ending every template at the end of the session (each ends its workers first), in s."""
STATUS_WAIT_S: Final = 5.0
"""After a hosted worker exited: bound on waiting for the template's report of its exit status, in s."""
STATUS_POLL_S: Final = 0.005
"""How often the report is looked for meanwhile (it is set by the host's run: no event to wait on), in s."""


class TemplateHost:
    """The test run's templates, in a Trio run of their own (a daemon thread); see the module doc."""

    def __init__(self, *, start_timeout: float) -> None:
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._launchers: dict[LauncherNeeds, SharedLauncher] = {}
        self._launcher_started: dict[LauncherNeeds, trio.Event] = {}
        self._closed = False

    # -- any thread ---------------------------------------------------------------------------------------
    def launcher(self, needs: LauncherNeeds) -> HostedLauncher:
        """A launcher for one test's pool, forking from the template for ``needs`` (started if none)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the test run's template host is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dspex-templates", daemon=True)
                self._thread.start()
                atexit.register(self.close)
        if not self._started.wait(HOST_START_TIMEOUT_S) or self._token is None:
            raise RuntimeError("the test run's template host did not start")
        return HostedLauncher(self, needs)

    def wait_ready(self, needs: LauncherNeeds) -> None:
        """From outside any Trio run: start the template for ``needs`` if none runs, and wait for it.

        Raises:
            ZygoteError, ProgramModuleError: as ``SharedLauncher.wait_ready``.
        """
        assert self._token is not None
        trio.from_thread.run(self._wait_ready, needs, trio_token=self._token)

    async def _wait_ready(self, needs: LauncherNeeds) -> None:
        await (await self._launcher_for(needs)).wait_ready()

    def provide(self, python: str, worker_env: tuple[str, ...], programs: tuple[str, ...]) -> HostedLauncher:
        """A ``dspex_trio._launcher.LauncherProvider``: the launcher of the template for these needs."""
        return self.launcher(LauncherNeeds(python=python, worker_env=worker_env, programs=programs))

    def fds(self) -> set[int]:
        """The file descriptors the templates hold in this process (control sockets, stderr pipes)."""
        return {fd for launcher in list(self._launchers.values()) for fd in launcher._template_fds()}

    @property
    def templates(self) -> dict[LauncherNeeds, int | None]:
        """Each template's pid (None while it starts or restarts), by needs."""
        return {needs: launcher.template_pid for needs, launcher in list(self._launchers.items())}

    def close(self) -> None:
        """End every template (and any worker still alive), and the host's thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None or self._token is None:
            return
        try:
            trio.from_thread.run_sync(self._request_stop, trio_token=self._token)
        except trio.RunFinishedError:
            return
        self._stopped.wait(HOST_STOP_TIMEOUT_S)

    # -- the host's own run ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            trio.run(self._main)
        finally:
            self._stopped.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()  # each open_launcher ends its template (shielded, bounded)

    def _request_stop(self) -> None:
        assert self._stop is not None
        self._stop.set()

    async def _serve_launcher(self, needs: LauncherNeeds, started: trio.Event) -> None:
        async with open_launcher(
            "zygote",
            python=needs.python,
            worker_env=needs.worker_env,
            programs=needs.programs,
            start_timeout=self.start_timeout,
        ) as launcher:
            self._launchers[needs] = launcher
            started.set()
            await trio.sleep_forever()

    async def _launcher_for(self, needs: LauncherNeeds) -> SharedLauncher:
        started = self._launcher_started.get(needs)
        if started is None:
            assert self._nursery is not None
            started = self._launcher_started[needs] = trio.Event()
            self._nursery.start_soon(self._serve_launcher, needs, started)
        await started.wait()
        return self._launchers[needs]

    async def _launch(self, needs: LauncherNeeds, spec: WorkerSpec) -> tuple[int, list[int], ZygoteWorker]:
        """In the host's run: fork a worker; our copies of its pipe ends go to the test's run."""
        launcher = await self._launcher_for(needs)
        process = await launcher.launch(spec)
        assert isinstance(process, ZygoteWorker)
        streams = (process._stdin, process._frames, process._stderr)
        fds: list[int] = []
        try:
            for stream in streams:
                fds.append(os.dup(stream.fileno()))
        except OSError:
            for fd in fds:
                os.close(fd)
            process._close_streams()
            raise
        process._close_streams()  # the host keeps none: the test's run owns the worker's pipes
        return process.pid, fds, process

    async def _subscribe(self, needs: LauncherNeeds, sink: EventSink, add: bool) -> None:
        launcher = await self._launcher_for(needs)
        if add:
            launcher._sinks.add(sink)
        else:
            launcher._sinks.discard(sink)


class HostedLauncher:
    """One test's launcher: workers forked from the host's template for its needs (a ``Launcher``)."""

    name = "zygote"

    def __init__(self, host: TemplateHost, needs: LauncherNeeds) -> None:
        self.host = host
        self.needs = needs

    def check_needs(self, needs: LauncherNeeds) -> None:
        check_needs(self.needs, needs)

    @asynccontextmanager
    async def lease(self, needs: LauncherNeeds, sink: EventSink | None = None) -> AsyncIterator[None]:
        """A pool's use of it: its needs checked, the template's health events forwarded to ``sink``
        (from the host's run, through this run's token)."""
        self.check_needs(needs)
        if sink is None:
            yield
            return
        token = trio.lowlevel.current_trio_token()

        def forward(kind: str, data: dict[str, Any]) -> None:
            try:
                token.run_sync_soon(sink, kind, data)
            except trio.RunFinishedError:
                pass

        await self._in_host(partial(self.host._subscribe, self.needs, forward, True))
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                await self._in_host(partial(self.host._subscribe, self.needs, forward, False))

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        # a bridge or a lone worker names its program modules in the spec: the template imports them
        needs = (
            self.needs
            if spec.programs == self.needs.programs
            else attrs.evolve(self.needs, programs=spec.programs)
        )
        pid, fds, process = await self._in_host(partial(self.host._launch, needs, spec))
        return HostedWorker(pid, fds, process, self.host)

    async def _in_host(self, fn: Callable[[], Any]) -> Any:
        token = self.host._token
        if token is None:
            raise ZygoteError(errno.ECHILD, "the test run's template host is not running")

        def call() -> Any:
            try:
                return trio.from_thread.run(fn, trio_token=token)
            except trio.RunFinishedError:
                raise ZygoteError(errno.ECHILD, "the test run's template host has stopped") from None

        return await trio.to_thread.run_sync(call)


class HostedWorker:
    """A worker forked in the host's run, its pipes owned by the test's run (a ``WorkerProcess``)."""

    def __init__(self, pid: int, fds: list[int], process: ZygoteWorker, host: TemplateHost) -> None:
        self._pid = pid
        self._streams = [trio.lowlevel.FdStream(fd) for fd in fds]
        self._process = process
        self._host = host
        self._exit_wait = trio.Lock()
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # already reaped by the template: its report is on its way
            self._pidfd = -1

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stdin(self) -> trio.abc.SendStream:
        return self._streams[0]

    @property
    def frames(self) -> trio.abc.ReceiveStream:
        return self._streams[1]

    @property
    def stderr(self) -> trio.abc.ReceiveStream:
        return self._streams[2]

    def exit_status(self) -> ExitStatus | None:
        return self._process.exit_status()  # (an attribute set by the host's run: a plain read)

    async def wait(self) -> ExitStatus:
        async with self._exit_wait:  # one task waits on the pidfd, the others on the lock
            if self._pidfd >= 0:
                try:
                    await trio.lowlevel.wait_readable(self._pidfd)  # it exited (cancellable, no thread)
                except trio.ClosedResourceError:  # closed by aclose: ask the template's report below
                    pass
        with trio.move_on_after(STATUS_WAIT_S):
            while (status := self._process.exit_status()) is None:  # noqa: ASYNC110 - another run's event
                await trio.sleep(STATUS_POLL_S)  # the template reaps it and reports within milliseconds
            return status
        return ExitStatus(code=None, signal=None)

    def signal_group(self, signum: int) -> None:
        signal_group(self._pid, signum)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for stream in self._streams:
                await stream.aclose()
            if self._pidfd >= 0:
                fd, self._pidfd = self._pidfd, -1
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
