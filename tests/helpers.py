"""Shared test utilities: process and file-descriptor inspection through ``/proc``, and polling.

Linux only (``/proc``); psutil is not a dependency. Real processes mean real time: wait for a condition
with :func:`wait_until` (poll with a bound), never sleep and hope.
"""

from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Awaitable, Callable

import pytest
import trio

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


def _read_stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of ``pid`` from ``/proc/PID/stat``, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``T``, ``Z``, ...), or None if it does not exist."""
    stat = _read_stat(pid)
    return None if stat is None else stat[0]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has exited; it only waits to be reaped)."""
    state = process_state(pid)
    return state is not None and state != "Z"


def child_processes(*, include_zombies: bool = True) -> dict[int, str]:
    """This process's direct children, ``{pid: state}``. Zombies (exited, not reaped) are included unless
    ``include_zombies`` is False: a zombie left behind is a leak too."""
    me = os.getpid()
    children: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read_stat(int(name))
        if stat is None:
            continue
        state, ppid = stat
        if ppid == me and (include_zombies or state != "Z"):
            children[int(name)] = state
    return children


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
