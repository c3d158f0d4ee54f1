"""The pool's launcher: which one starts its workers, and a zygote kept alive for it.

:func:`open_launcher` turns ``open_pool(launcher=...)`` into a running launcher: ``"subprocess"``
(``python -m bridge_child``, :class:`~dspex_trio._launcher.SubprocessLauncher`), ``"zygote"`` or
``"auto"`` (a :class:`SupervisedZygote`: the fork server of ``_zygote.py``, restarted when it dies;
``"auto"`` falls back to subprocesses where the zygote cannot work), or a ``Launcher`` object, used as it
is. The zygote process itself, its control socket and the workers it forks are ``_zygote.py``'s.
"""

from __future__ import annotations

import collections
import errno
import logging
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import attrs
import trio

from dspex_trio._errors import ProgramModuleError
from dspex_trio._launcher import (
    Launcher,
    SubprocessLauncher,
    WorkerProcess,
    WorkerSpec,
    check_env_names,
    default_launcher,
    provided_launcher,
)
from dspex_trio._shared_launcher import EventSink, LauncherNeeds, Shareable
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
"""The launchers ``open_pool(launcher=...)`` names (or it takes a ``Launcher`` object)."""


@attrs.define(eq=False)
class SupervisedZygote:
    """A launcher backed by a zygote that is restarted when it dies (made by :func:`open_launcher`).

    While no template is ready (it is being restarted), and for good once the template failed to start
    or died more than ``max_restarts`` times within ``restart_period`` seconds, workers are started by
    the subprocess launcher instead, if ``fallback`` allows it; otherwise ``launch`` raises
    :class:`ZygoteError`. A dead template's context is kept open until the workers it forked have
    exited (they keep serving meanwhile), so a restart never kills a running worker.
    """

    python: str = sys.executable
    env: Mapping[str, str] | None = None
    worker_env: Sequence[str] = attrs.field(default=(), converter=check_env_names)
    """Variables of this process's environment the workers get besides the allow-list."""
    programs: Sequence[str] = ()
    """The operator's program modules, imported by each template before it forks."""
    fallback: bool = True
    start_timeout: float = DEFAULT_START_TIMEOUT_S
    spawn_timeout: float = DEFAULT_SPAWN_TIMEOUT_S
    max_restarts: int = 3
    restart_period: float = 60.0
    name: str = "zygote"
    """"zygote", or "subprocess" once it fell back for good."""
    zygote: ZygoteLauncher | None = None
    """The current template, None while none is ready."""
    restarts: int = 0
    """Templates started after the first one."""
    fallback_reason: str | None = None
    """Why it stopped using the zygote (None while it uses it)."""
    _subprocess: SubprocessLauncher = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._subprocess = SubprocessLauncher(python=self.python, env=self.env, worker_env=self.worker_env)

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        zygote = self.zygote
        if zygote is not None and zygote.alive:
            try:
                return await zygote.launch(spec)
            except ZygoteError:
                if zygote.alive or not self.fallback:
                    raise  # it refused this one request (e.g. fork failed): the caller's restart policy
        if not self.fallback:
            reason = self.fallback_reason or "the zygote is restarting"
            raise ZygoteError(errno.ECHILD, f"no zygote to fork {spec.worker_id}: {reason}")
        return await self._subprocess.launch(spec)

    async def _supervise(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        failures: collections.deque[float] = collections.deque()
        started = False
        error: ZygoteError | ProgramModuleError | None = None
        async with trio.open_nursery() as generations:
            while True:
                try:
                    zygote: ZygoteLauncher = await generations.start(self._generation)
                except (ZygoteError, ProgramModuleError) as exc:
                    reason = str(exc)
                    if not started and isinstance(exc, ProgramModuleError):
                        raise  # the operator's modules cannot be used: no fallback can help
                    if not started:  # it cannot work here: do not retry at every start
                        self._give_up(reason)
                        error = exc
                        break
                else:
                    self.zygote = zygote
                    if not started:
                        started = True
                        task_status.started()
                    await zygote.wait_dead()
                    self.zygote = None
                    reason = zygote.death_reason or "it died"
                now = trio.current_time()
                failures.append(now)
                while failures and failures[0] < now - self.restart_period:
                    failures.popleft()
                if len(failures) > self.max_restarts:
                    self._give_up(f"{len(failures)} failures within {self.restart_period} s, last: {reason}")
                    break
                await trio.sleep(0.1 * 2 ** (len(failures) - 1))  # 0.1, 0.2, 0.4 s ...
                self.restarts += 1
                logger.info("restarting the zygote (restart %d)", self.restarts)
        # (a dead template's context stays open until its workers exit: see _generation)
        if error is not None and not self.fallback:
            raise error
        if not started:
            task_status.started()

    async def _generation(self, *, task_status: trio.TaskStatus[ZygoteLauncher]) -> None:
        async with open_zygote(
            python=self.python,
            env=self.env,
            worker_env=self.worker_env,
            programs=self.programs,
            start_timeout=self.start_timeout,
            spawn_timeout=self.spawn_timeout,
        ) as zygote:
            task_status.started(zygote)
            await zygote.wait_dead()
            await zygote.wait_idle()  # its workers serve on; leaving the context would kill them

    def _give_up(self, reason: str) -> None:
        self.fallback_reason = reason
        if self.fallback:
            self.name = "subprocess"
            logger.warning("zygote unavailable, starting workers as subprocesses: %s", reason)
        else:
            logger.error("zygote unavailable: %s", reason)


@asynccontextmanager
async def open_launcher(
    kind: str | Launcher = "auto",
    *,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    worker_env: Sequence[str] = (),
    programs: Sequence[str] = (),
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
    events: EventSink | None = None,
) -> AsyncIterator[Launcher]:
    """The launcher of a pool, owned by this context.

    ``kind`` is "auto" (a restarted zygote where the platform supports it, falling back to subprocesses
    when it cannot work; or the running launcher ``_launcher.DEFAULT_LAUNCHER`` provides, if set),
    "zygote" (a restarted zygote, no fallback: raises :class:`ZygoteError` if the template cannot start), "subprocess", or a ``Launcher`` (yielded as it is: its owner runs it, and
    builds its workers' environment itself). ``worker_env`` names the variables of this process's
    environment the workers get besides the allow-list (``dspex_trio._launcher.worker_environment``);
    ``programs`` the operator's program modules, which a zygote template imports before it forks (a
    subprocess worker imports them itself: ``WorkerSpec.programs``).
    Leaving the block stops the zygote (see :func:`~dspex_trio._zygote.open_zygote`): close the workers
    first. A :class:`~dspex_trio._shared_launcher.SharedLauncher` (``dspex_trio.open_launcher``) is used,
    not owned: its needs must match these (``python``, ``worker_env``, ``programs``), and its health
    events (a template died, restarted) go to ``events``.

    Raises:
        ValueError: ``kind`` is none of these, or ``worker_env`` is given beside a ``Launcher`` (it would
            not apply).
        LauncherMismatch: a shared launcher made for other needs.
    """
    if kind == "auto":  # a running launcher for these needs, if one is provided (the pytest plugin's)
        kind = provided_launcher(python, worker_env, programs) or kind
    if isinstance(kind, Shareable):
        needs = LauncherNeeds(python=python, worker_env=tuple(worker_env), programs=programs)
        async with kind.lease(needs, events):
            yield kind
        return
    if not isinstance(kind, str):
        yield default_launcher(kind, worker_env)
        return
    if kind not in LAUNCHER_KINDS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHER_KINDS)} or a Launcher, not {kind!r}")
    if kind == "subprocess" or (kind == "auto" and not zygote_supported()):
        yield SubprocessLauncher(python=python, env=env, worker_env=worker_env)
        return
    launcher = SupervisedZygote(
        python=python,
        env=env,
        worker_env=worker_env,
        programs=programs,
        fallback=kind == "auto",
        start_timeout=start_timeout,
    )
    async with open_service_nursery() as nursery:
        await nursery.start(launcher._supervise)
        try:
            yield launcher
        finally:
            nursery.cancel_scope.cancel()


if TYPE_CHECKING:

    def _implements(supervised: SupervisedZygote) -> Launcher:
        return supervised  # mypy checks the protocol here
