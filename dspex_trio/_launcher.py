"""How worker processes are started: the interface, the worker environment, the subprocess launcher.

A launcher turns a :class:`WorkerSpec` into a running :class:`WorkerProcess`: a process in its own
process group with three pipes (calls in, frames out, stderr out). The worker handle does the rest
(handshake, calls, the teardown ladder) the same way whichever launcher started the process.

Workers never inherit this process's environment: :func:`worker_environment` builds theirs from an
allow-list (what Python, DSPy and the runtime need: ``ALLOWED_ENV``, ``ALLOWED_ENV_PREFIXES``), the
names the operator lists (``worker_env``), ``WORKER_ENV`` and a launcher's explicit ``env`` values.
So a server's ``OPENAI_API_KEY``, ``DSPEX_TOKEN`` or cloud credentials reach a worker only when the
operator names them (docs/security.md).
"""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

import attrs
import trio

from bridge_child import wire
from dspex_trio._errors import ExitStatus

DEFAULT_CAPACITY: Final = 64
"""Calls one worker runs at once (threads in the worker)."""

WORKER_ENV: Final[Mapping[str, str]] = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "PYTHONUNBUFFERED": "1",
}
"""Set in every worker's environment (see docs/configuration.md)."""

ALLOWED_ENV: Final = frozenset(
    {
        # the process: where programs and libraries are, who and where we are
        "PATH", "HOME", "USER", "LOGNAME", "TZ", "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH",
        # text: locale (and the LC_* family, below)
        "LANG", "LANGUAGE",
        # the interpreter: how it finds and imports code, and its run-time switches
        "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUSERBASE",
        "PYTHONPLATLIBDIR", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONCOERCECLOCALE", "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONWARNINGS", "PYTHONDEVMODE",
        "PYTHONFAULTHANDLER", "PYTHONTRACEMALLOC", "PYTHONMALLOC", "PYTHONINTMAXSTRDIGITS",
        "PYTHONOPTIMIZE", "PYTHONASYNCIODEBUG", "PYTHONBREAKPOINT", "VIRTUAL_ENV",
        # the network: TLS trust and proxies (a proxy URL's own credentials only ever go to the proxy)
        "SSL_CERT_FILE", "SSL_CERT_DIR",
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
        "http_proxy", "https_proxy", "all_proxy", "no_proxy",
        # DSPy's cache location and size (the workers disable the disk cache; a program may not)
        "DSPY_CACHEDIR", "DSPY_CACHE_LIMIT",
        # the project's test and benchmark harnesses tag every process they start with these, to
        # find them all in /proc afterwards (tests/dspex_trio/test_faults.py, benchmarks/_common.py)
        "DSPEX_TEST_TAG", "DSPEX_BENCH_TAG",
    }
)  # fmt: skip
"""Variables a worker (and the zygote template) gets from this process's environment when set. Each is
explained in docs/security.md; none holds a credential. Anything else needs ``worker_env``."""
ALLOWED_ENV_PREFIXES: Final = ("LC_", "COVERAGE_")
"""Families passed the same way: the locale categories, and coverage.py's settings (measuring the
workers under ``coverage``). A name in them that looks like a secret (``SECRET_NAME_SUFFIXES``) is not."""
SECRET_NAME_SUFFIXES: Final = ("_API_KEY", "_TOKEN", "_SECRET", "_SECRET_KEY", "_PASSWORD", "_CREDENTIALS")
"""Never passed by a family prefix; only an explicit ``worker_env`` name passes such a variable."""


def check_env_names(names: Sequence[str]) -> tuple[str, ...]:
    """``worker_env`` as a tuple of variable names; ``TypeError``/``ValueError`` if it is not one."""
    if isinstance(names, str | bytes):
        raise TypeError(f"worker_env must be a sequence of variable names, not one string ({names!r})")
    checked = tuple(names)
    for name in checked:
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise ValueError(f"worker_env: {name!r} is not an environment variable name")
    return checked


def worker_environment(
    environ: Mapping[str, str], names: Sequence[str] = (), extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a worker (or of the zygote template, which its forks inherit).

    From ``environ`` (this process's environment): the variables of ``ALLOWED_ENV``, those of the
    ``ALLOWED_ENV_PREFIXES`` families whose names do not end like a secret, and the ``names`` the
    operator lists (``worker_env``: passed if set, whatever they look like); then ``WORKER_ENV``;
    then ``extra`` (a launcher's explicit values), which wins. Nothing else: never ``DSPEX_TOKEN``,
    ``*_API_KEY``, ``*_TOKEN``, ``*_SECRET`` unless named.
    """
    named = set(check_env_names(names))
    env = {
        name: value
        for name, value in environ.items()
        if name in named
        or name in ALLOWED_ENV
        or (name.startswith(ALLOWED_ENV_PREFIXES) and not name.upper().endswith(SECRET_NAME_SUFFIXES))
    }
    return {**env, **WORKER_ENV, **(extra or {})}


@attrs.frozen
class WorkerSpec:
    """What to start."""

    worker_id: str
    diagnostics: bool = False
    """Enable the diagnostic methods (echo, sleep, crash, hang, ...)."""
    capacity: int = DEFAULT_CAPACITY
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    fail_at_start: int | None = None
    """Diagnostics: the worker exits with this code before its handshake (restart-storm tests)."""
    programs: tuple[str, ...] = ()
    """The operator's program modules, imported before the handshake (``bridge_child.registry``)."""
    lease_lms: bool = False
    """The worker asks the host for a lease before each LM request (the pool's LM budgets)."""
    async_capacity: int = 0
    """Executions with a network LM run on the worker's event loop, up to this many (0: none)."""
    lm_cache: tuple[str, ...] = ()
    """The worker's LM cache arguments (``LMCache.argv``; empty: no LM cache)."""

    def argv(self) -> list[str]:
        """The ``bridge_child`` command-line arguments for this spec."""
        args = ["--worker-id", self.worker_id, "--capacity", str(self.capacity)]
        args += ["--max-frame-bytes", str(self.max_frame_bytes)]
        if self.diagnostics:
            args.append("--diagnostics")
        if self.fail_at_start is not None:
            args += ["--fail-at-start", str(self.fail_at_start)]
        if self.programs:
            args += ["--programs", ",".join(self.programs)]
        if self.lease_lms:
            args.append("--lease-lms")
        if self.async_capacity:
            args += ["--async-capacity", str(self.async_capacity)]
        args += self.lm_cache
        return args


class WorkerProcess(Protocol):
    """A started worker process, as the worker handle sees it."""

    @property
    def pid(self) -> int: ...

    @property
    def stdin(self) -> trio.abc.SendStream:
        """Frames to the worker."""

    @property
    def frames(self) -> trio.abc.ReceiveStream:
        """Frames from the worker (its private copy of the original stdout)."""

    @property
    def stderr(self) -> trio.abc.ReceiveStream:
        """The worker's stderr (and its fd 1, which points there)."""

    def exit_status(self) -> ExitStatus | None:
        """How it ended, or None while it runs (or has not been reaped yet)."""

    async def wait(self) -> ExitStatus:
        """Wait until it exits (and is reaped). Cancellation leaves it running."""

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the worker's whole process group (grandchildren included)."""

    async def aclose(self) -> None:
        """Close our ends of its pipes. Does not wait for or signal the process."""


class Launcher(Protocol):
    name: str
    """"zygote" or "subprocess" (reported in statistics)."""

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        """Start one worker. Raises ``OSError`` (or a launcher error) if it cannot be started."""


LauncherProvider = Callable[[str, tuple[str, ...], tuple[str, ...]], "Launcher | None"]
"""``provider(python, worker_env, programs)``: a launcher already running for these needs, or None."""
DEFAULT_LAUNCHER: contextvars.ContextVar[LauncherProvider | None] = contextvars.ContextVar(
    "dspex_default_launcher", default=None
)
"""Where workers come from when no launcher is named (``open_worker()``, the bridge, ``open_pool(launcher=
"auto")``): None (the default) starts them cold; the pytest plugin sets a provider of the test run's warm
templates (``dspex_trio.testing.warm_templates_by_default``)."""


def provided_launcher(python: str, worker_env: Sequence[str], programs: Sequence[str]) -> Launcher | None:
    """The launcher ``DEFAULT_LAUNCHER`` provides for these needs (None: none is set, start cold)."""
    provider = DEFAULT_LAUNCHER.get()
    return None if provider is None else provider(python, tuple(worker_env), tuple(programs))


def default_launcher(launcher: Launcher | None, worker_env: Sequence[str]) -> Launcher:
    """``launcher``, or (when None) the one ``DEFAULT_LAUNCHER`` provides, or a
    :class:`SubprocessLauncher` passing ``worker_env``.

    A launcher object builds its workers' environment itself: ``worker_env`` given beside one is a
    ``ValueError`` (it would silently not apply); give it to that launcher instead.
    """
    if launcher is None:
        return provided_launcher(sys.executable, worker_env, ()) or SubprocessLauncher(worker_env=worker_env)
    if worker_env:
        raise ValueError(
            "worker_env is applied by the launcher: pass it to the launcher you give "
            "(SubprocessLauncher(worker_env=...), open_launcher(..., worker_env=...))"
        )
    return launcher


def signal_group(pid: int, signum: int) -> None:
    """``killpg`` that tolerates a group that is already gone."""
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@attrs.define(eq=False)
class SubprocessWorker:
    """A worker started as ``python -m bridge_child`` by :class:`SubprocessLauncher`."""

    process: trio.Process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdin(self) -> trio.abc.SendStream:
        assert self.process.stdin is not None
        return self.process.stdin

    @property
    def frames(self) -> trio.abc.ReceiveStream:
        assert self.process.stdout is not None
        return self.process.stdout

    @property
    def stderr(self) -> trio.abc.ReceiveStream:
        assert self.process.stderr is not None
        return self.process.stderr

    def exit_status(self) -> ExitStatus | None:
        code = self.process.returncode
        return None if code is None else ExitStatus.from_returncode(code)

    async def wait(self) -> ExitStatus:
        return ExitStatus.from_returncode(await self.process.wait())

    def signal_group(self, signum: int) -> None:
        signal_group(self.process.pid, signum)

    async def aclose(self) -> None:
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()


@attrs.define(eq=False)
class SubprocessLauncher:
    """Start each worker as ``<python> -m bridge_child`` (a cold start: ~0.1 s, plus dspy's import on
    first use). Works with any interpreter that has ``bridge_child`` importable."""

    python: str = sys.executable
    """The interpreter to run (any venv with dspex-trio installed)."""
    env: Mapping[str, str] | None = None
    """Explicit environment values for the workers (added to :func:`worker_environment`'s)."""
    extra_args: Sequence[str] = ()
    name: str = "subprocess"
    worker_env: Sequence[str] = attrs.field(default=(), converter=check_env_names)
    """Names of variables of this process's environment the workers get besides the allow-list
    (e.g. ``OPENAI_API_KEY`` for an operator LM that reads its key from the environment)."""

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        env = worker_environment(os.environ, self.worker_env, self.env)
        process = await trio.lowlevel.open_process(
            [self.python, "-m", "bridge_child", *spec.argv(), *self.extra_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: teardown signals reach grandchildren too
            env=env,
        )
        return SubprocessWorker(process)
