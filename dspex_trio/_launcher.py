"""How worker processes are started: the interface, and the subprocess launcher.

A launcher turns a :class:`WorkerSpec` into a running :class:`WorkerProcess`: a process in its own
process group with three pipes (calls in, frames out, stderr out). The worker handle does the rest
(handshake, calls, the teardown ladder) the same way whichever launcher started the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
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

    def argv(self) -> list[str]:
        """The ``bridge_child`` command-line arguments for this spec."""
        args = ["--worker-id", self.worker_id, "--capacity", str(self.capacity)]
        args += ["--max-frame-bytes", str(self.max_frame_bytes)]
        if self.diagnostics:
            args.append("--diagnostics")
        if self.fail_at_start is not None:
            args += ["--fail-at-start", str(self.fail_at_start)]
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
    """Extra environment for the workers (added to this process's environment and ``WORKER_ENV``)."""
    extra_args: Sequence[str] = ()
    name: str = "subprocess"

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        env = {**os.environ, **WORKER_ENV, **(self.env or {})}
        process = await trio.lowlevel.open_process(
            [self.python, "-m", "bridge_child", *spec.argv(), *self.extra_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: teardown signals reach grandchildren too
            env=env,
        )
        return SubprocessWorker(process)
