"""Shared test utilities: process and file-descriptor inspection through ``/proc``, and polling.

Linux only (``/proc``); psutil is not a dependency. Real processes mean real time: wait for a condition
with :func:`wait_until` (poll with a bound), never sleep and hope.
"""

from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import pytest
import trio

from dspex_trio.testing._plugin import _template_pids

POLL_INTERVAL_S = 0.01
"""How often :func:`wait_until` checks its predicate, in seconds."""


def open_fd_count() -> int:
    """Open file descriptors of this process (``/proc/self/fd``; the directory's own fd is left out)."""
    return len(open_fds())


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each points to (for a readable diff on a leak)."""
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd of the listdir itself, closed by now
            continue
    return fds


class ProcStat(NamedTuple):
    """What ``/proc/PID/stat`` says of a process."""

    state: str
    """One letter: ``R``, ``S``, ``T``, ``Z`` (zombie: exited, not reaped), ..."""
    ppid: int
    pgid: int


def proc_stat(pid: int) -> ProcStat | None:
    """``pid``'s state, parent and process group, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = data[data.rindex(b")") + 2 :].split()
    return ProcStat(fields[0].decode(), int(fields[1]), int(fields[2]))


def process_table() -> dict[int, ProcStat]:
    """Every process on the machine that could be read, by pid."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := proc_stat(int(name))) is not None:
            table[int(name)] = stat
    return table


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``T``, ``Z``, ...), or None if it does not exist."""
    stat = proc_stat(pid)
    return None if stat is None else stat.state


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has exited; it only waits to be reaped)."""
    state = process_state(pid)
    return state is not None and state != "Z"


def child_processes(*, include_zombies: bool = True) -> dict[int, str]:
    """This process's direct children, ``{pid: state}``. Zombies (exited, not reaped) are included unless
    ``include_zombies`` is False: a zombie left behind is a leak too. The test run's warm templates
    (``tests/conftest.py``) outlive every test on purpose: not counted; the workers they fork are."""
    me = os.getpid()
    templates = _template_pids()
    return {
        pid: stat.state
        for pid, stat in process_table().items()
        if ((stat.ppid == me and pid not in templates) or stat.ppid in templates)
        and (include_zombies or stat.state != "Z")
    }


def kill_quietly(pid: int, signum: int = signal.SIGKILL, *, group: bool = False) -> None:
    """Send ``signum`` to ``pid`` (or its process group), ignoring a process that is already gone.
    For ``finally`` clauses: nothing a test started may outlive it."""
    try:
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


async def read_until(
    stream: trio.abc.ReceiveStream, done: Callable[[bytes], bool], message: str | Callable[[], str]
) -> bytes:
    """Read ``stream`` (a child's stdout, say) until ``done`` holds for what was read; return it all.

    The stream ending first fails the test's assertion with ``message`` (or a callable producing it,
    evaluated then: a child's exit code, say) and the end of what was read. Bound it with the caller's
    ``trio.fail_after``.
    """
    data = b""
    while not done(data):
        chunk = await stream.receive_some(4096)
        assert chunk, f"{message() if callable(message) else message} (read: {data[-500:]!r})"
        data += chunk
    return data


async def wait_until(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float,
    message: str | Callable[[], str] = "",
) -> float:
    """Poll ``predicate`` (sync, or async) every 10 ms until it returns something truthy; return the
    seconds it took.

    Fails the test (``pytest.fail``) if it is still false after ``timeout`` seconds (an async predicate
    still running then is cancelled); ``message`` (or a callable producing it, evaluated at failure time)
    says what was awaited and what was seen.
    """
    start = trio.current_time()
    deadline = start + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            awaitable, value = value, False
            with trio.move_on_at(deadline):  # a predicate that hangs fails at the bound too
                value = await awaitable
        if value:
            return trio.current_time() - start
        if trio.current_time() >= deadline:
            what = message() if callable(message) else message
            name = getattr(predicate, "__name__", repr(predicate))
            pytest.fail(f"condition {name} still false after {timeout} s" + (f": {what}" if what else ""))
        await trio.sleep(POLL_INTERVAL_S)
