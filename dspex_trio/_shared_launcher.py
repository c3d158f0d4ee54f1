"""A launcher that outlives one pool: a warm zygote template shared by every pool opened on it.

``async with open_launcher("zygote", programs=[...]) as launcher:`` returns at once while the template
(``python -m bridge_child._zygote``: dspy, trio and the operator's program modules imported once) starts
in the background; then any number of ``open_pool(launcher=launcher, ...)``, one after another or at
once, fork their workers from it. A pool opened before the template is ready waits for it (up to
``start_timeout``); one opened after is ready in milliseconds.

Ownership stays structured: the launcher's nursery owns the template (``_zygote.open_zygote``), and
leaving the block ends the template and every worker it forked that is still alive. Each template is
made for one set of needs (:class:`LauncherNeeds`: interpreter, environment names, program modules); a
pool whose needs differ gets :class:`LauncherMismatch`, never a silent cold start.

A template that died (killed, crashed) is not restarted behind anyone's back: the next worker launch
(the next pool, or a pool replacing a worker) starts a new one, waits for it, and every pool open on
the launcher is told with a ``launcher`` health event (``template_died``, then ``template_restarted``).
A dead template is never used.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import attrs
import trio

from bridge_child.registry import check_module_names
from dspex_trio._errors import DspexError, ProgramModuleError
from dspex_trio._events import EventBus, Subscription
from dspex_trio._exports import NoPublicConstructor
from dspex_trio._launcher import (
    Launcher,
    SubprocessLauncher,
    SubprocessWorker,
    WorkerProcess,
    WorkerSpec,
    check_env_names,
)
from dspex_trio._util import open_service_nursery
from dspex_trio._zygote import (
    DEFAULT_SPAWN_TIMEOUT_S,
    DEFAULT_START_TIMEOUT_S,
    ZygoteError,
    ZygoteLauncher,
    open_zygote,
    zygote_supported,
)

logger = logging.getLogger("dspex_trio.zygote")

LAUNCHER_KINDS: Final = ("auto", "zygote", "subprocess")
"""What ``open_launcher`` takes: a shared zygote (``auto`` falls back to subprocesses where the template
cannot run), or plain ``python -m bridge_child`` subprocesses."""
LAUNCH_ATTEMPTS: Final = 2
"""A launch whose template died under it is tried once more on a restarted template, then fails."""

EventSink = Callable[[str, dict[str, Any]], object]
"""Where a pool wants the launcher's health events: ``EventBus.publish(kind, data)``."""


class LauncherMismatch(DspexError, ValueError):
    """A pool's needs (interpreter, ``worker_env`` names, program modules) differ from those of the
    shared launcher it was given: its template cannot start that pool's workers."""


@attrs.frozen
class LauncherNeeds:
    """What a template is made for: its workers can serve only pools that need exactly this."""

    python: str
    """The interpreter of the template (and of subprocess workers)."""
    worker_env: tuple[str, ...] = attrs.field(default=(), converter=check_env_names)
    """Names of variables of this process's environment the workers get besides the allow-list."""
    programs: tuple[str, ...] = attrs.field(default=(), converter=check_module_names)
    """The operator's program modules, imported by the template before it forks."""

    def differences(self, other: LauncherNeeds) -> list[str]:
        """What differs from ``other``, one phrase per field (empty when they match)."""
        return [
            f"{field.name}: the launcher has {getattr(self, field.name)!r}, "
            f"the pool needs {getattr(other, field.name)!r}"
            for field in attrs.fields(LauncherNeeds)
            if getattr(self, field.name) != getattr(other, field.name)
        ]


def check_needs(have: LauncherNeeds, need: LauncherNeeds) -> None:
    """Raise :class:`LauncherMismatch` unless a launcher made for ``have`` serves a pool needing ``need``."""
    differences = have.differences(need)
    if differences:
        raise LauncherMismatch(
            "this shared launcher cannot start the pool's workers (open a launcher for these needs, "
            "or open the pool without one): " + "; ".join(differences)
        )


@runtime_checkable
class Shareable(Launcher, Protocol):
    """A launcher that pools use without owning it (:class:`SharedLauncher`, the pytest plugin's)."""

    def lease(self, needs: LauncherNeeds, sink: EventSink | None = None) -> AbstractAsyncContextManager[None]:
        """A pool's use of it: raises :class:`LauncherMismatch` if ``needs`` differ from the launcher's;
        sends the launcher's health events to ``sink`` while the block runs."""
        ...


class SharedLauncher(metaclass=NoPublicConstructor):
    """A launcher shared by pools (from :func:`open_launcher`): give it as ``open_pool(launcher=...)``.

    It satisfies the ``Launcher`` interface too (``launch(spec)``). ``name`` is ``"zygote"``, or
    ``"subprocess"`` (asked for, or ``auto`` fell back). Attributes read at any time: ``ready`` (a live
    template is waiting for requests), ``template_pid``, ``restarts`` (templates started after the
    first), ``fallback_reason``.
    """

    def __init__(
        self,
        *,
        kind: str,
        needs: LauncherNeeds,
        env: Mapping[str, str] | None,
        start_timeout: float,
        spawn_timeout: float,
    ) -> None:
        self.kind = kind
        self.needs = needs
        self.env = env
        self.start_timeout = start_timeout
        self.spawn_timeout = spawn_timeout
        self.name = "subprocess" if kind == "subprocess" else "zygote"
        self.restarts = 0
        self.fallback_reason: str | None = None
        """Why ``auto`` uses subprocesses instead of the template (None while it uses the template)."""
        self.last_death: str | None = None
        """Why the last template stopped (None while none has)."""
        self._subprocess = SubprocessLauncher(python=needs.python, env=env, worker_env=needs.worker_env)
        self._zygote: ZygoteLauncher | None = None
        self._closed = False
        self._attempt = 0
        """Template starts begun (the first, then one per restart)."""
        self._finished = 0
        """The last template start that ended (ready or failed)."""
        self._starting = False
        self._failure: ZygoteError | ProgramModuleError | None = None
        """Why the last template start failed (None if it succeeded)."""
        self._wanted = trio.Event()
        self._wanted.set()  # the first template starts at once, in the background
        self._changed = trio.Event()
        self._first_spawned = trio.Event()
        """Set once the first template process runs (or failed to): ``open_launcher`` returns then."""
        self.events = EventBus(backend="launcher")
        """The launcher's health events (``launcher``: ``template_died``, ``template_restarted``); every
        pool open on it gets them too."""
        self._sinks: set[EventSink] = set()
        self._subprocess_workers: weakref.WeakSet[SubprocessWorker] = weakref.WeakSet()

    # -- what anyone may read ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True while a live template takes requests (always True for subprocesses)."""
        if self.name == "subprocess":
            return not self._closed
        return self._zygote is not None and self._zygote.alive

    @property
    def template_pid(self) -> int | None:
        """The running template's pid (None while none runs)."""
        zygote = self._zygote
        return zygote.pid if zygote is not None and zygote.alive else None

    @property
    def running_workers(self) -> int:
        """Workers forked by the current template that have not exited yet."""
        zygote = self._zygote
        return zygote.running_workers if zygote is not None else 0

    def subscribe_health(self, *, buffer: int | None = None) -> AbstractAsyncContextManager[Subscription]:
        """``async with launcher.subscribe_health() as events: async for event in events: ...``: the
        ``launcher`` health events published while the block runs (bounded, as a pool's)."""
        return self.events.subscribe(buffer=buffer)

    def _template_fds(self) -> set[int]:
        """This process's fds of the running template: its control socket and stderr pipe."""
        zygote = self._zygote
        if zygote is None:
            return set()
        fds = {zygote._sock.fileno()}
        if zygote.process.stderr is not None:
            stderr = zygote.process.stderr
            assert isinstance(stderr, trio.lowlevel.FdStream)
            fds.add(stderr.fileno())
        return fds

    def check_needs(self, needs: LauncherNeeds) -> None:
        """Raise :class:`LauncherMismatch` unless a pool needing ``needs`` can use this launcher."""
        check_needs(self.needs, needs)

    async def wait_ready(self) -> None:
        """Wait until a template is ready (starting one if none runs), up to ``start_timeout``.

        Raises:
            ZygoteError: the template could not start in time (or at all), or the launcher is closed.
            ProgramModuleError: the operator's program modules cannot be used.
        """
        await self._acquire()

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        """Start one worker: fork it from the template (waiting for one to be ready, starting it if the
        last one died), or as a subprocess. Raises ``OSError`` (:class:`ZygoteError`) if it cannot."""
        for _ in range(LAUNCH_ATTEMPTS):
            zygote = await self._acquire()
            if zygote is None:  # subprocesses (asked for, or auto fell back)
                process = await self._subprocess.launch(spec)
                assert isinstance(process, SubprocessWorker)
                self._subprocess_workers.add(process)
                return process
            try:
                return await zygote.launch(spec)
            except ZygoteError:
                if zygote.alive:
                    raise  # it refused this one request: the caller's restart policy decides
                # it died under this launch: once more, on a restarted template
        raise ZygoteError(errno.ECHILD, f"the zygote template died during each launch of {spec.worker_id}")

    # -- the pools' side --------------------------------------------------------------------------------
    @asynccontextmanager
    async def lease(self, needs: LauncherNeeds, sink: EventSink | None = None) -> AsyncIterator[None]:
        """A pool's use of this launcher: checks its needs, sends it the launcher's health events."""
        self.check_needs(needs)
        if self._closed:
            raise ZygoteError(errno.ECHILD, "the shared launcher is closed")
        if sink is not None:
            self._sinks.add(sink)
        try:
            yield
        finally:
            if sink is not None:
                self._sinks.discard(sink)

    def _publish(self, event: str, data: dict[str, Any]) -> None:
        self.events.publish("launcher", {"event": event, **data})
        for sink in list(self._sinks):
            sink("launcher", {"event": event, **data})

    # -- internals ----------------------------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _acquire(self) -> ZygoteLauncher | None:
        """The live template (None: use subprocesses), starting one if none runs; bounded by
        ``start_timeout``."""
        with trio.move_on_after(self.start_timeout):
            while True:
                if self._closed:
                    raise ZygoteError(errno.ECHILD, "the shared launcher is closed")
                if self.name == "subprocess":
                    return None
                zygote = self._zygote
                if zygote is not None and zygote.alive:
                    return zygote
                if self._starting:
                    target = self._attempt  # wait for the start under way
                else:
                    target = self._attempt + 1  # ask for one, wait for it
                    self._wanted.set()
                while self._finished < target and not self._closed:
                    await self._changed.wait()
                if self._closed:
                    continue
                failure = self._failure
                if failure is not None and self.name != "subprocess":
                    if isinstance(failure, ProgramModuleError):
                        raise ProgramModuleError(str(failure))
                    raise ZygoteError(failure.errno or errno.ECHILD, str(failure))
        raise ZygoteError(errno.ETIMEDOUT, f"no zygote template ready within {self.start_timeout} s")

    async def _supervise(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a template whenever one is wanted and none runs; each lives in its own task (see
        ``_generation``), so a dead one's workers keep serving while the next one starts."""
        async with trio.open_nursery() as generations:
            task_status.started()
            while True:
                await self._wanted.wait()
                self._wanted = trio.Event()
                self._attempt += 1
                self._starting = True
                self._notify()
                try:
                    zygote: ZygoteLauncher = await generations.start(self._generation)
                except (ZygoteError, ProgramModuleError) as exc:
                    self._first_spawned.set()
                    self._starting = False
                    self._failure = exc
                    self._finished = self._attempt
                    if self.kind == "auto" and isinstance(exc, ZygoteError) and self._attempt == 1:
                        self.name = "subprocess"  # it cannot work here: say so once, use subprocesses
                        self.fallback_reason = str(exc)
                        logger.warning("zygote unavailable, starting workers as subprocesses: %s", exc)
                    self._notify()
                    continue
                self._zygote = zygote
                self._starting = False
                self._failure = None
                self._finished = self._attempt
                if self._attempt > 1:
                    self.restarts += 1
                    logger.info("zygote template restarted (pid %d): %s", zygote.pid, self.last_death)
                    self._publish(
                        "template_restarted",
                        {"pid": zygote.pid, "restarts": self.restarts, "reason": self.last_death},
                    )
                self._notify()
                await zygote.wait_dead()
                self._zygote = None
                self.last_death = zygote.death_reason or "it died"
                self._publish("template_died", {"pid": zygote.pid, "reason": self.last_death})
                self._notify()

    async def _generation(self, *, task_status: trio.TaskStatus[ZygoteLauncher]) -> None:
        async with open_zygote(
            python=self.needs.python,
            env=self.env,
            worker_env=self.needs.worker_env,
            programs=self.needs.programs,
            start_timeout=self.start_timeout,
            spawn_timeout=self.spawn_timeout,
            on_spawned=self._first_spawned.set,
        ) as zygote:
            task_status.started(zygote)
            await zygote.wait_dead()
            await zygote.wait_idle()  # its workers serve on; leaving the context would kill them

    def _close(self) -> None:
        """No more launches; waiters fail. Subprocess workers still running are killed (the templates'
        workers are killed by their ``open_zygote`` contexts)."""
        self._closed = True
        self.events.close()
        self._notify()
        for process in list(self._subprocess_workers):
            if process.exit_status() is None:
                process.signal_group(signal.SIGKILL)


@asynccontextmanager
async def open_launcher(
    kind: str = "auto",
    *,
    programs: Sequence[str] = (),
    worker_env: Sequence[str] = (),
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
    spawn_timeout: float = DEFAULT_SPAWN_TIMEOUT_S,
) -> AsyncIterator[SharedLauncher]:
    """A launcher shared by any number of pools (``open_pool(launcher=...)``), owned by this context.

    Returns as soon as the template process runs (milliseconds): it imports in the background (await ``launcher.wait_ready()`` to wait for
    it). ``kind`` is ``"zygote"`` (fork every worker from one warm template; raises, at launch, if it
    cannot start), ``"auto"`` (the same, or subprocesses where the template cannot run: a warning, and
    ``fallback_reason`` says why) or ``"subprocess"`` (cold ``python -m bridge_child`` workers).
    ``programs``, ``worker_env`` and ``python`` are the needs of the pools it serves (they must match:
    :class:`LauncherMismatch`); ``env`` adds explicit values to the workers' environment;
    ``start_timeout`` bounds a pool's wait for a template (s), ``spawn_timeout`` one fork (s).

    Leaving the block ends the template and every worker still alive (close the pools first: their
    workers would be killed under them). Nothing is left running, even if this process is SIGKILLed
    (the template exits on its control socket's EOF, each worker on its stdin's EOF).

    Raises:
        ValueError: ``kind`` is none of the kinds, or ``worker_env`` is not a sequence of names.
    """
    if kind not in LAUNCHER_KINDS:
        raise ValueError(f"launcher kind must be one of {', '.join(LAUNCHER_KINDS)}, not {kind!r}")
    needs = LauncherNeeds(python=python, worker_env=tuple(worker_env), programs=programs)
    if kind == "auto" and not zygote_supported():
        kind = "subprocess"
    launcher = SharedLauncher._create(
        kind=kind, needs=needs, env=env, start_timeout=start_timeout, spawn_timeout=spawn_timeout
    )
    if kind == "subprocess":
        try:
            yield launcher
        finally:
            launcher._close()
        return
    async with open_service_nursery() as nursery:
        await nursery.start(launcher._supervise)
        await launcher._first_spawned.wait()  # the process runs (a few ms); it imports in the background
        try:
            yield launcher
        finally:
            launcher._close()
            nursery.cancel_scope.cancel()


if TYPE_CHECKING:

    def _implements(shared: SharedLauncher) -> Shareable:
        return shared  # mypy checks the protocol here
