"""The zygote: a template process that imports dspy and trio once and forks each worker on request.

Run by the runtime (``dspex_trio._zygote.open_zygote``), never by hand::

    python -m bridge_child._zygote --control-fd N [--programs myapp.programs,other.module]

``N`` is the template's end of an ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair (one datagram per message,
so no framing; file descriptors ride along as ``SCM_RIGHTS``). Messages are JSON objects:

parent -> template
    ``{"op": "spawn", "id": I, "argv": [...]}`` with exactly three fds: the worker's stdin (read end), its
    frame stream (write end) and its stderr (write end). ``argv`` is ``WorkerSpec.argv()``.
    ``{"op": "spawn", "id": I, "argv": [...], "tcp": {"connect": "HOST:PORT", "token": T, "node": N}}``
    with exactly two fds: the worker's stdin (read end: the pool's secret, then its lifeline) and its
    stderr (write end). The worker dials the host and serves its frames over TCP (``bridge_child.tcp``):
    how a Ray node's agent (``dspex_trio._ray_agent``) forks its workers. ``tcp`` may hold ``"env"``:
    the accelerators Ray assigned to the worker's reservation (names of ``ACCELERATOR_ENV`` only, e.g.
    ``{"CUDA_VISIBLE_DEVICES": "1"}``), set in the forked worker's environment before it runs anything.
template -> parent
    ``{"op": "ready", "pid": P, "versions": {...}, "preload_s": S, "programs": [...]}`` once, when it can
    fork (it imported dspy and the operator's program modules);
    ``{"op": "failed", "module": M, "message": E}`` instead, when a program module cannot be used (it
    does not import, or registers something invalid, or starts a thread: see
    ``bridge_child.registry``), then it exits with ``registry.EXIT_PROGRAMS``;
    ``{"op": "spawned", "id": I, "pid": P}`` or ``{"op": "error", "id": I, "message": M}``, one per spawn;
    ``{"op": "exit", "pid": P, "code": C, "signal": S}`` when a forked worker has exited and been reaped
    (the workers are the template's children, not the runtime's: this is how it learns exit statuses).

Rules the template keeps (see ``notes/dspy-3.4.md``): it stays single-threaded (checked before every
fork), never runs an event loop, imports no litellm, opens no network client and no disk cache. It
reaps its children from a ``select`` loop woken by SIGCHLD (``signal.set_wakeup_fd``) and a periodic
timeout, so it never blocks on a child. Its writes to the control socket are non-blocking (queued until
the socket is writable), so a parent that stops reading cannot wedge it. When the control socket reaches
EOF (the runtime closed it, or died) the template exits at once; its workers see their own stdin reach
EOF and exit by themselves. SIGINT is ignored: the runtime decides when it ends.

A forked worker: its own process group (set by both the template and the child, the classic race-free
way: the group exists before the runtime learns the pid, so a signal to the group cannot miss; no new
session is needed, the template's has no controlling terminal), every inherited fd closed but its three
pipes (stdin on 0, stderr on 1 and 2, frames on a private non-inheritable fd), signal handlers reset,
random generators re-seeded, then ``bridge_child._server.run_worker``; it always ends in ``os._exit``.
Importing this module does nothing; only :func:`main` acts.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import os
import random
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

from bridge_child.tcp import ACCELERATOR_ENV, MAX_ACCELERATOR_ENV_CHARS

MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest control message either way."""
SPAWN_FDS: Final = 3
"""File descriptors that come with a ``spawn`` request: stdin (read), frames (write), stderr (write)."""
TCP_SPAWN_FDS: Final = 2
"""File descriptors that come with a ``spawn`` request of a TCP worker: stdin (read), stderr (write)."""
MAX_TCP_FIELD_CHARS: Final = 512
"""Longest ``connect``, ``token`` or ``node`` of a TCP spawn."""
REAP_INTERVAL_S: Final = 1.0
"""The loop reaps children at least this often, even if a SIGCHLD wake-up was lost."""
EXIT_TEMPLATE_ERROR: Final = 70
"""A forked worker's exit code when the template's own code failed in it before the worker ran."""


def _log(message: str) -> None:
    try:
        os.write(2, f"bridge_child._zygote[{os.getpid()}]: {message}\n".encode(errors="replace"))
    except OSError:
        pass


class Template:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.control.setblocking(False)
        self.outbox: deque[bytes] = deque()
        self.children: set[int] = set()
        # SIGCHLD wakes the select loop through a non-blocking pipe; the handler itself does nothing.
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    # -- messages ---------------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        self.outbox.append(json.dumps(message, separators=(",", ":")).encode())
        self.flush()

    def flush(self) -> None:
        while self.outbox:
            try:
                self.control.send(self.outbox[0])
            except (BlockingIOError, InterruptedError):
                return  # the loop waits for the socket to be writable
            except OSError:  # the parent is gone: EOF on the next read ends us
                self.outbox.clear()
                return
            self.outbox.popleft()

    # -- the loop ---------------------------------------------------------------------------------------
    def serve(self) -> NoReturn:
        control = self.control.fileno()
        while True:
            writers = [control] if self.outbox else []
            try:
                readable, writable, _ = select.select([control, self.wake_r], writers, [], REAP_INTERVAL_S)
            except InterruptedError:  # pragma: no cover - PEP 475 retries select
                readable, writable = [], []
            if self.wake_r in readable:
                _drain(self.wake_r)
            self.reap()
            if control in readable:
                self.receive()
            if writable or self.outbox:
                self.flush()

    def receive(self) -> None:
        try:
            data, fds, flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE_BYTES, SPAWN_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.exit(f"control socket failed ({exc}); exiting")
        if not data and not fds:
            self.exit("control socket closed; exiting")
        try:
            self.handle(data, fds, flags)
        finally:
            for fd in fds:
                _close(fd)

    def handle(self, data: bytes, fds: list[int], flags: int) -> None:
        try:
            message = json.loads(data)
            request_id = message["id"]
            op = message["op"]
        except (ValueError, KeyError, TypeError) as exc:
            _log(f"ignoring an unreadable control message ({exc})")
            return
        if op != "spawn":
            self.send({"op": "error", "id": request_id, "message": f"unknown op {op!r}"})
            return
        argv = message.get("argv")
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            self.send({"op": "error", "id": request_id, "message": "argv must be a list of strings"})
            return
        tcp = message.get("tcp")
        if tcp is not None and not _valid_tcp(tcp):
            self.send(
                {
                    "op": "error",
                    "id": request_id,
                    "message": "tcp needs string connect, token, node (and env: accelerator variables only)",
                }
            )
            return
        expected = SPAWN_FDS if tcp is None else TCP_SPAWN_FDS
        if flags & socket.MSG_CTRUNC or len(fds) != expected:
            self.send(
                {"op": "error", "id": request_id, "message": f"expected {expected} fds, got {len(fds)}"}
            )
            return
        try:
            pid = self.fork_worker(argv, fds, tcp)
        except OSError as exc:
            self.send({"op": "error", "id": request_id, "message": f"fork failed: {exc}"})
            return
        self.children.add(pid)
        self.send({"op": "spawned", "id": request_id, "pid": pid})

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            self.send({"op": "exit", "pid": pid, "code": code, "signal": signum})

    def exit(self, reason: str) -> NoReturn:
        if self.children:
            _log(f"{reason} ({len(self.children)} worker(s) still running: they exit on their stdin EOF)")
        sys.stderr.flush()
        os._exit(0)

    # -- forking ----------------------------------------------------------------------------------------
    def fork_worker(self, argv: list[str], fds: list[int], tcp: dict[str, Any] | None = None) -> int:
        threads = threading.active_count()
        if threads != 1:  # a fork with other threads alive may copy a held lock: refuse instead
            raise OSError(errno.EDEADLK, f"the template has {threads} threads; forking is unsafe")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child (measured by the tests, not by coverage)
            if tcp is None:
                self.become_worker(argv, *fds)
            self.become_tcp_worker(argv, tcp, *fds)
        # The child makes itself a group leader too; doing it here as well means the group exists before
        # the runtime hears the pid, so a signal to the group sent at once cannot miss.
        try:
            os.setpgid(pid, pid)
        except OSError:  # it already died (and may be reaped soon): its exit is reported as usual
            pass
        return pid

    def _leave_template(self, stdin_fd: int, stderr_fd: int) -> None:
        """In a forked child: its own process group and signals, none of the template's objects, stdin on
        0 and stderr on 1 and 2 (the caller closes the other inherited fds)."""
        os.setpgid(0, 0)  # own process group (the template did it too: whichever runs first wins)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # Close the template's own objects through their owners (so no finalizer closes a reused fd
        # number later), then every other inherited fd but the pipes the caller keeps.
        self.control.close()
        _close(self.wake_r)
        _close(self.wake_w)
        os.dup2(stdin_fd, 0)
        os.dup2(stderr_fd, 1)
        os.dup2(stderr_fd, 2)

    def become_worker(self, argv: list[str], stdin_fd: int, frames_fd: int, stderr_fd: int) -> NoReturn:
        def run() -> int:
            self._leave_template(stdin_fd, stderr_fd)
            os.set_inheritable(frames_fd, False)  # the worker's grandchildren must not hold it
            os.closerange(3, frames_fd)
            os.closerange(frames_fd + 1, _max_fd())
            _reseed()
            from bridge_child._server import parse_args, prepare_process, run_worker

            args = parse_args(argv)
            prepare_process()
            sys.argv = ["bridge_child", *argv]
            return run_worker(args, read_fd=0, write_fd=frames_fd)

        _run_then_exit(run)

    def become_tcp_worker(
        self, argv: list[str], tcp: dict[str, Any], stdin_fd: int, stderr_fd: int
    ) -> NoReturn:
        """A worker that serves its frames over TCP (``bridge_child.tcp.serve``): stdin on 0 (its secret,
        then its lifeline), stderr on 1 and 2, nothing else inherited."""

        def run() -> int:
            self._leave_template(stdin_fd, stderr_fd)
            os.closerange(3, _max_fd())
            os.environ.update(tcp.get("env") or {})  # its accelerators (checked by _valid_tcp)
            _reseed()
            from bridge_child import tcp as tcp_worker

            sys.argv = ["bridge_child.tcp", *argv]
            return tcp_worker.serve(tcp["connect"], tcp["token"], tcp["node"], argv)

        _run_then_exit(run)


def _run_then_exit(run: Callable[[], int]) -> NoReturn:
    """Run a forked worker's body and leave the process with its exit code, whatever it raises (a
    ``SystemExit``'s code, its message on stderr and 1 for a text; a traceback and
    ``EXIT_TEMPLATE_ERROR`` for anything else): never return into the template's loop."""
    code = EXIT_TEMPLATE_ERROR
    try:
        code = run()
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _valid_tcp(tcp: object) -> bool:
    if not isinstance(tcp, dict) or not all(
        isinstance(tcp.get(key), str) and len(tcp[key]) <= MAX_TCP_FIELD_CHARS
        for key in ("connect", "token", "node")
    ):
        return False
    env = tcp.get("env", {})
    return isinstance(env, dict) and all(
        name in ACCELERATOR_ENV
        and isinstance(value, str)
        and len(value) <= MAX_ACCELERATOR_ENV_CHARS
        and "\0" not in value
        for name, value in env.items()
    )


def _ignore_signal(signum: int, frame: object) -> None:
    """A Python-level handler, so the C handler writes the signal number to the wake-up fd."""


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):  # pragma: no cover
        return 65536


def _reseed() -> None:
    """A forked child starts with its template's generator states: re-seed what was imported."""
    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:  # pragma: no cover - dspy 3.4 does not import it
        numpy_random.seed()


def _preload(programs: list[str]) -> dict[str, Any]:
    """Import dspy, trio, the worker and the operator's program modules (``RegistryError`` if one cannot
    be used: a thread it starts is refused here, since the template forks)."""
    from bridge_child import _programs, registry
    from bridge_child._server import library_versions

    started = time.perf_counter()
    _programs.preload()
    import trio  # noqa: F401  # workers that use Trio later (streaming) do not pay its import

    import bridge_child._server  # noqa: F401

    registry.activate(programs, single_threaded=True)
    preload_s = time.perf_counter() - started
    # Move everything imported so far out of the collector's reach: a child's collections then never
    # write to these objects' GC headers, so their pages stay shared with the template (copy-on-write).
    gc.freeze()
    return {"versions": library_versions(), "preload_s": round(preload_s, 4), "programs": programs}


@contextlib.contextmanager
def _exit_on_eof(control: socket.socket) -> Iterator[None]:
    """While the block runs, a watcher thread exits the process as soon as the control socket reaches
    EOF (the runtime died or gave up); the main loop's own EOF check only starts after the preload. The
    thread is stopped and joined on leaving, so the template is single-threaded again before any fork.
    (Nothing but EOF can arrive before ``ready``: the runtime sends no request until then.)"""
    stop_r, stop_w = os.pipe()

    def watch() -> None:
        while True:
            readable, _, _ = select.select([control.fileno(), stop_r], [], [])
            if stop_r in readable:
                return
            try:
                data = control.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                os._exit(0)
            return  # a message came early: the main loop reads it after the preload

    watcher = threading.Thread(target=watch, name="zygote-eof-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        os.write(stop_w, b"x")
        watcher.join()
        os.close(stop_r)
        os.close(stop_w)


def main(argv: list[str]) -> NoReturn:
    # Stdout hygiene before anything is imported: nothing the template (or dspy at import) prints may
    # reach its stdout; each worker re-points its own fds 0-2 anyway.
    os.dup2(2, 1)
    parser = argparse.ArgumentParser(prog="python -m bridge_child._zygote", description=__doc__)
    parser.add_argument("--control-fd", type=int, required=True, help="the template's end of the socket")
    parser.add_argument("--programs", default="", help="program modules to import, comma-separated")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=args.control_fd)
    control.set_inheritable(False)
    programs = [name for name in args.programs.split(",") if name]
    with _exit_on_eof(control):  # the preload takes ~1 s: a parent dying meanwhile must not wait for it
        try:
            info = _preload(programs)
        except Exception as exc:
            from bridge_child.registry import EXIT_PROGRAMS, RegistryError

            if not isinstance(exc, RegistryError | ValueError):
                raise
            _log(str(exc))
            report = {"op": "failed", "module": getattr(exc, "module", None), "message": str(exc)}
            try:
                control.send(json.dumps(report)[:MAX_MESSAGE_BYTES].encode())
            except OSError:
                pass
            os._exit(EXIT_PROGRAMS)
    threads = threading.active_count()
    if threads != 1:
        _log(f"preloading started {threads - 1} thread(s): cannot fork safely")
        os._exit(EXIT_TEMPLATE_ERROR)
    template = Template(control)
    template.send({"op": "ready", "pid": os.getpid(), **info})
    template.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
