"""A Ray node's agent: one actor per node (and set of program modules) that runs a zygote template there
and forks that node's workers (``RayLauncher``, ``dspex_trio._ray_launcher``).

The agent runs in Ray's worker process on its node, with threads and no Trio. It starts the template
(``python -m bridge_child._zygote``: dspy, trio and the operator's program modules imported once per
node) with the workers' environment, and on ``spawn`` hands it two pipes per worker (a TCP ``spawn``,
see ``bridge_child._zygote``): the worker's stdin, on which the agent writes the pool's secret and then
keeps the write end open as the worker's *lifeline*, and its stderr, which the agent reads. The forked
worker dials the host's listener and serves its frames over TCP, as a cold ``bridge_child.tcp`` does.

What the host learns, it learns by :meth:`NodeAgent.poll` (one long poll at a time per agent, from the
launcher): the exit status of each worker (the template reaps them and reports it), its resident
memory and age (this node's ``/proc``, at most every ``USAGE_INTERVAL_S``), and what each wrote to
stderr, bounded: at most ``STDERR_BUFFER_BYTES`` held per worker between two polls and
``STDERR_BYTES_PER_S`` relayed per worker per second; the excess is dropped and said so in the stream
(``[dspex: N bytes of stderr dropped]``).

The agent's own *lifeline* is a TCP connection to the host's worker listener (the launcher's), which
it dials before it starts its template and authenticates like a worker (the pool's secret, a token of
its own: ``bridge_child.tcp.connect``). Nothing is sent on it; the agent waits for its end. When it
ends (EOF: the launcher closed it, or the host's process died and its kernel closed it; or an error:
a reset, or TCP keepalive finding the host's machine gone, ``LIFELINE_KEEPALIVE_*``, minutes), the
agent kills its workers and its template, removes their placement groups (the ``placement_group`` of
each ``spawn``) and ends its actor (``ray.kill`` of itself, then
``os._exit`` if that did not end it within ``SELF_EXIT_FALLBACK_S``). So a lost host leaves nothing
behind even when Ray itself keeps its actors (a Ray Client host: the client server keeps its session
for the reconnect grace period). A host that is only slow (stalled, loaded) keeps its connection and
its kernel answers keepalives: it is never taken for dead.

How things end: the agent is killed (its node lost, the host gone: Ray kills the actors a driver owned,
or ``ray.kill``): the template sees its control socket close and exits; every worker sees its lifeline
hang up and exits with its process group. The host's lifeline ends: as above. The template dies
alone: the agent kills its workers and says so in its next poll (``dead``), and the launcher replaces
the agent on the next start.

Importing this module imports neither Ray nor Trio.
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from dspex_trio._launcher import worker_environment
from dspex_trio._metrics import process_rss_bytes, process_start_seconds, uptime_seconds

TEMPLATE_START_TIMEOUT_S: Final = 60.0
"""From starting the template to its ``ready`` (it imports dspy and the program modules)."""
SPAWN_TIMEOUT_S: Final = 10.0
"""From a spawn request to the template's reply (a fork takes milliseconds)."""
MAX_MESSAGE_BYTES: Final = 64 * 1024
"""Largest control message (the template's limit too)."""
STDERR_READ_BYTES: Final = 64 * 1024
"""Most bytes read from one worker's stderr pipe at a time."""
STDERR_BUFFER_BYTES: Final = 64 * 1024
"""Most stderr bytes held per worker between two polls; more is dropped (and counted)."""
STDERR_BYTES_PER_S: Final = 256 * 1024
"""Most stderr bytes relayed per worker per second; more is dropped (and counted)."""
TEMPLATE_EXIT_WAIT_S: Final = 5.0
"""After the template closed its control socket: how long to wait for its exit status."""
MAX_POLL_S: Final = 10.0
"""Longest wait of one :meth:`NodeAgent.poll`."""
USAGE_INTERVAL_S: Final = 1.0
"""A poll reads its workers' resident memory and age (this node's ``/proc``) at most this often."""
AGENT_CONCURRENCY: Final = 16
"""Threads of an agent actor: one poll, concurrent spawns, signals."""
LIFELINE_KEEPALIVE_IDLE_S: Final = 60
"""The host's lifeline: seconds without traffic before TCP keepalive probes start (the kernel's, so a
stalled host process still answers them)."""
LIFELINE_KEEPALIVE_INTERVAL_S: Final = 10
"""Seconds between two keepalive probes."""
LIFELINE_KEEPALIVE_PROBES: Final = 6
"""Unanswered probes before the connection counts as broken (the host's machine gone without a FIN:
about 2 minutes in all)."""
LIFELINE_READ_BYTES: Final = 64
"""Most bytes read from the lifeline at a time."""
LIFELINE_DROP: Final = b"\x00"
"""The one byte a launcher sends on a lifeline before it closes it on purpose to drop a live agent (its
template died, its poll failed): the agent then leaves its workers' placement groups to the launcher,
which may reuse them. Anything else read is ignored."""
TEMPLATE_KILL_WAIT_S: Final = 5.0
"""After SIGKILL to the template (the host is gone): how long to wait for it to be reaped."""
SELF_EXIT_FALLBACK_S: Final = 5.0
"""After asking Ray to end this actor (the host is gone): how long until the process exits by itself."""
EXITED_GROUP_KEEP_S: Final = 30.0
"""How long the agent still counts an exited worker's placement group as its own: removed with the others
if the host goes within it (the launcher keeps such a group ``PLACEMENT_LINGER_S``, 5 s, for a
replacement; and a host dying makes its workers exit before the agent learns of it)."""
MAX_EXITED_GROUPS: Final = 256
"""Most exited workers' placement groups an agent keeps (the oldest go first)."""


class _Worker:
    """A forked worker, as its agent sees it."""

    def __init__(self, pid: int, lifeline: int, stderr: int) -> None:
        self.pid = pid
        self.lifeline = lifeline
        """The write end of its stdin: closing it (or the agent's death) makes it exit."""
        self.stderr = stderr
        """The read end of its stderr (-1 once at EOF)."""
        self.buffer = bytearray()
        self.dropped = 0
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.exited = False
        self.eof_reported = False

    def take(self, data: bytes, now: float) -> None:
        """Keep ``data`` within the buffer and rate bounds; count what is dropped."""
        if now - self.window_start >= 1.0:
            self.window_start, self.window_bytes = now, 0
        room = min(STDERR_BUFFER_BYTES - len(self.buffer), STDERR_BYTES_PER_S - self.window_bytes)
        kept = data[: max(0, room)]
        self.buffer += kept
        self.window_bytes += len(kept)
        self.dropped += len(data) - len(kept)

    def drain(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        if self.dropped:
            data += f"\n[dspex: {self.dropped} bytes of stderr dropped]\n".encode()
            self.dropped = 0
        return data


class NodeAgent:
    """The agent of one node (see the module doc). Made by ``ray.remote(NodeAgent)`` in the launcher,
    pinned to its node; every method is called from Ray's actor threads."""

    def __init__(
        self,
        env: Mapping[str, str],
        worker_env: Sequence[str],
        programs: Sequence[str],
        lifeline: Sequence[str] | None = None,
    ) -> None:
        """``lifeline``: ``(connect_to, token, secret_hex, node)`` of the host's listener, dialed before
        anything else (``RuntimeError`` if it cannot be); None: no lifeline (tests drive the agent)."""
        self.host_lost: str | None = None
        """Why the host's lifeline ended (None while it holds, or without one)."""
        self.dropped = False
        """The launcher said it drops this agent (``LIFELINE_DROP``) before it closed the lifeline."""
        self._lifeline = _dial_host(*lifeline) if lifeline is not None else None
        self._lock = threading.Lock()
        self._news = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any] | None] = {}
        self._pending_fds: dict[int, tuple[int, int]] = {}
        """Spawn requests in flight: id -> (lifeline write end, stderr read end), registered by the reader
        with the ``spawned`` reply (so no exit report can come before its worker is known)."""
        self._workers: dict[int, _Worker] = {}
        self._exits: dict[int, int | None] = {}
        """Exits reported by the template and not yet polled: pid -> return code (negative: signal)."""
        self._dead: str | None = None
        self._usage_at = -math.inf
        self._groups: dict[int, str] = {}
        """The placement group (hex id) of each worker that has one, while the agent knows the worker."""
        self._exited_groups: dict[str, float] = {}
        """Placement groups of workers forgotten lately -> when (``time.monotonic``), oldest first (at
        most ``MAX_EXITED_GROUPS``, none older than ``EXITED_GROUP_KEEP_S``)."""
        control, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        programs_args = ["--programs", ",".join(programs)] if programs else []
        try:  # the lifeline is closed if the template does not start
            try:
                self._template = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bridge_child._zygote",
                        "--control-fd",
                        str(child.fileno()),
                        *programs_args,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    pass_fds=(child.fileno(),),
                    start_new_session=True,
                    env=worker_environment(os.environ, worker_env, env),
                )
            finally:
                child.close()
            self._control = control
            self.info = self._wait_ready()
        except BaseException:
            if self._lifeline is not None:
                self._lifeline.close()
            raise
        threading.Thread(target=self._read_loop, name="dspex-agent-reader", daemon=True).start()
        if self._lifeline is not None:
            threading.Thread(target=self._watch_host, name="dspex-agent-lifeline", daemon=True).start()

    def _wait_ready(self) -> dict[str, Any]:
        self._control.settimeout(TEMPLATE_START_TIMEOUT_S)
        try:
            message = json.loads(self._control.recv(MAX_MESSAGE_BYTES) or b"null")
        except (OSError, ValueError) as exc:
            self._template.kill()
            raise RuntimeError(f"the node's zygote template did not start: {exc!r}") from None
        finally:
            self._control.settimeout(None)
        if not isinstance(message, dict) or message.get("op") != "ready":
            self._template.kill()
            self._template.wait()
            detail = message.get("message") if isinstance(message, dict) else None
            raise RuntimeError(
                f"the node's zygote template failed to start (exit {self._template.returncode}): {detail}"
            )
        node_id = ""
        ray = connected_ray()
        if ray is not None:  # else not in Ray (tests drive the agent directly)
            node_id = ray.get_runtime_context().get_node_id()
        return {
            "node_id": node_id,
            "pid": os.getpid(),
            "template_pid": self._template.pid,
            "preload_s": message.get("preload_s"),
        }

    # -- the actor's methods ---------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Where the agent runs and how long its template's preload took (it is ready once this returns)."""
        return self.info

    def spawn(
        self,
        connect_to: str,
        token: str,
        secret_hex: str,
        node: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        placement_group: str | None = None,
    ) -> int:
        """Fork a worker that dials ``connect_to`` with ``token``; its pid. ``env``: the accelerators of
        its reservation (``bridge_child.tcp.ACCELERATOR_ENV`` names), set in its environment;
        ``placement_group``: the hex id of that reservation (removed by the agent if its host's lifeline
        ends). ``RuntimeError`` if the template cannot."""
        if self._dead is not None:
            raise RuntimeError(f"the agent's template is gone: {self._dead}")
        request_id = next(self._ids)
        lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        tcp: dict[str, Any] = {"connect": connect_to, "token": token, "node": node}
        if env:
            tcp["env"] = dict(env)
        payload = json.dumps({"op": "spawn", "id": request_id, "argv": argv, "tcp": tcp}).encode()
        with self._lock:
            self._replies[request_id] = None
            self._pending_fds[request_id] = (lifeline_w, stderr_r)
        try:
            with self._send_lock:
                socket.send_fds(self._control, [payload], [lifeline_r, stderr_w])
            with self._news:
                self._news.wait_for(
                    lambda: self._replies.get(request_id) is not None or self._dead is not None,
                    SPAWN_TIMEOUT_S,
                )
                reply = self._replies.pop(request_id, None)
                unclaimed = self._pending_fds.pop(request_id, None)
        finally:
            os.close(lifeline_r)
            os.close(stderr_w)
        if unclaimed is not None:  # no worker took them (an error, a timeout, or an exception above)
            os.close(lifeline_w)
            os.close(stderr_r)
        if reply is None or reply.get("op") != "spawned":
            why = reply.get("message") if reply else (self._dead or f"no reply within {SPAWN_TIMEOUT_S} s")
            raise RuntimeError(f"the node's template could not fork a worker: {why}")
        pid = int(reply["pid"])
        if placement_group:
            with self._lock:
                self._groups[pid] = placement_group
        try:
            os.write(lifeline_w, secret_hex.encode() + b"\n")  # a pipe's buffer takes it whole
        except OSError:  # it died already: its exit is reported as usual
            pass
        return pid

    def signal(self, pid: int, signum: int) -> None:
        """Send ``signum`` to the process group of a worker this agent forked (if it still runs)."""
        with self._lock:
            worker = self._workers.get(pid)
            known = worker is not None and not worker.exited and pid not in self._exits
        if known:
            try:
                os.killpg(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def close(self) -> None:
        """Stop: the template sees its control socket end and exits, and the workers still running are
        killed. (An agent killed by Ray gets the same from the kernel: its fds close with it.)"""
        try:
            self._control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._template_gone("the agent was closed")

    def poll(self, timeout: float) -> dict[str, Any]:
        """What happened since the last poll, once something did or after ``timeout`` s (at most
        ``MAX_POLL_S``): ``exits`` (pid -> return code, negative for a signal), ``stderr`` (pid -> bytes),
        ``eof`` (pids whose stderr ended), ``dead`` (why the template is gone, or None), ``usage`` (pid ->
        [resident bytes, age in seconds] of the workers running, read from ``/proc`` at most every
        ``USAGE_INTERVAL_S``; either may be None, the pid gone)."""
        with self._news:
            self._news.wait_for(self._has_news, min(max(timeout, 0.0), MAX_POLL_S))
            exits, self._exits = self._exits, {}
            for pid in exits:
                exited = self._workers.get(pid)
                if exited is not None:
                    exited.exited = True
                    if exited.lifeline >= 0:
                        os.close(exited.lifeline)
                        exited.lifeline = -1
            stderr: dict[int, bytes] = {}
            eof: list[int] = []
            for worker in list(self._workers.values()):
                if worker.buffer or worker.dropped:
                    stderr[worker.pid] = worker.drain()
                if worker.stderr < 0 and not worker.eof_reported:
                    worker.eof_reported = True
                    eof.append(worker.pid)
                if worker.exited and worker.eof_reported:  # both seen: forget it
                    del self._workers[worker.pid]
                    self._forget_group(worker.pid, time.monotonic())
            now = time.monotonic()
            running = [w.pid for w in self._workers.values() if not w.exited]
            if now - self._usage_at < USAGE_INTERVAL_S:
                running = []
            else:
                self._usage_at = now
        return {
            "exits": exits,
            "stderr": stderr,
            "eof": eof,
            "dead": self._dead,
            "usage": _usage(running),
        }

    def _has_news(self) -> bool:
        return bool(
            self._exits
            or self._dead
            or any(
                w.buffer or w.dropped or (w.stderr < 0 and not w.eof_reported) for w in self._workers.values()
            )
        )

    # -- the host's lifeline ---------------------------------------------------------------------------
    def _watch_host(self) -> None:
        """Wait for the end of the host's lifeline, then end everything of this agent (module doc)."""
        assert self._lifeline is not None
        reason = "EOF (the launcher dropped this agent or left, or the host is gone)"
        try:
            while data := self._lifeline.recv(LIFELINE_READ_BYTES):
                if LIFELINE_DROP in data:
                    self.dropped = True
        except OSError as exc:
            reason = f"an error ({exc}: the host is unreachable)"
        finally:
            self._lifeline.close()
        self._host_gone(f"its lifeline to the host ended: {reason}")

    def _host_gone(self, reason: str) -> None:
        """Kill the workers and the template, remove the workers' placement groups, then end the actor.

        The groups are its workers' and those of the workers that exited lately (``_own_groups``),
        taken before the kills: a host that dies makes its workers exit (their connections to it end)
        and a ``poll`` of the host's may still run here (Ray runs an actor's call to its end whatever
        became of its caller), which forgets the exited workers, possibly before this thread learns of
        the lifeline's end."""
        self.host_lost = reason
        groups = self._own_groups(time.monotonic())
        print(f"dspex-trio agent: {reason}; killing the template and its workers", file=sys.stderr)
        try:
            self._control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._template_gone(reason)  # kills the workers' process groups
        try:
            os.killpg(self._template.pid, signal.SIGKILL)  # its own session, so its own group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self._template.wait(timeout=TEMPLATE_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        if not self.dropped:  # else the launcher's to reuse or remove
            self._remove_groups(groups)
        self._exit_actor()

    def _forget_group(self, pid: int, now: float) -> None:
        """Worker ``pid`` is forgotten: its placement group (if any) stays the agent's for a while. The
        caller holds ``_lock``."""
        group = self._groups.pop(pid, None)
        if group is not None:
            self._exited_groups.pop(group, None)  # a group reused by a replacement: its latest exit
            self._exited_groups[group] = now
        for old, at in list(self._exited_groups.items()):  # oldest first
            if now - at < EXITED_GROUP_KEEP_S and len(self._exited_groups) <= MAX_EXITED_GROUPS:
                break
            del self._exited_groups[old]

    def _own_groups(self, now: float) -> set[str]:
        """The placement groups to remove if the host is gone: its workers', and those of the workers
        that exited within ``EXITED_GROUP_KEEP_S``."""
        with self._lock:
            recent = {g for g, at in self._exited_groups.items() if now - at < EXITED_GROUP_KEEP_S}
            return set(self._groups.values()) | recent

    def _remove_groups(self, groups: set[str]) -> None:
        """Remove these placement groups, its workers' (a Ray Client host's would otherwise be kept for
        Ray Client's reconnect grace period). Not in Ray (tests): nothing."""
        ray = connected_ray()
        if not groups or ray is None:
            return
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        for group in groups:
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))
            except Exception as exc:  # already removed, or Ray is unreachable
                print(f"dspex-trio agent: placement group {group} not removed: {exc!r}", file=sys.stderr)

    def _exit_actor(self) -> None:
        """End this actor: Ray kills it (and marks it dead) at once; should that not happen (Ray's GCS
        unreachable), the process exits anyway after ``SELF_EXIT_FALLBACK_S``; its remaining fds (the
        workers' lifeline pipes) close with it. Not in Ray (tests): nothing."""
        ray = connected_ray()
        if ray is None or ray.get_runtime_context().get_actor_id() is None:
            return  # not an actor (tests drive the agent in their own process)
        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception as exc:  # not an actor, or Ray is gone: the fallback below
            print(f"dspex-trio agent: ray.kill of itself failed: {exc!r}", file=sys.stderr)
        time.sleep(SELF_EXIT_FALLBACK_S)
        os._exit(1)

    # -- the reader thread -----------------------------------------------------------------------------
    def _read_loop(self) -> None:
        control = self._control.fileno()
        try:
            while True:
                with self._lock:
                    pipes = {w.stderr: w for w in self._workers.values() if w.stderr >= 0}
                readable, _, _ = select.select([control, *pipes], [], [])
                if control in readable and not self._read_control():
                    return
                now = time.monotonic()
                for fd in readable:
                    worker = pipes.get(fd)
                    if worker is not None:
                        self._read_stderr(worker, now)
        except Exception as exc:  # pragma: no cover - a bug here must not leave workers unwatched
            self._template_gone(f"the agent's reader failed: {exc!r}")

    def _read_control(self) -> bool:
        try:
            data = self._control.recv(MAX_MESSAGE_BYTES)
        except OSError as exc:
            self._template_gone(f"its control socket failed ({exc})")
            return False
        if not data:
            try:
                code: int | None = self._template.wait(timeout=TEMPLATE_EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                code = None
            self._template_gone(f"the template exited ({code})")
            return False
        message = json.loads(data)
        with self._news:
            op = message.get("op")
            if op == "exit":
                code, signum = message.get("code"), message.get("signal")
                self._exits[int(message["pid"])] = -signum if signum else code
            elif op in ("spawned", "error") and message.get("id") in self._replies:
                self._replies[message["id"]] = message
                fds = self._pending_fds.pop(message["id"], None)
                if op == "spawned" and fds is not None:
                    pid = int(message["pid"])
                    self._workers[pid] = _Worker(pid, *fds)
                elif fds is not None:
                    self._pending_fds[message["id"]] = fds  # the spawner closes them
            self._news.notify_all()
        return True

    def _read_stderr(self, worker: _Worker, now: float) -> None:
        try:
            data = os.read(worker.stderr, STDERR_READ_BYTES)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return
            data = b""
        with self._news:
            if data:
                worker.take(data, now)
            else:
                os.close(worker.stderr)
                worker.stderr = -1
            self._news.notify_all()

    def _template_gone(self, reason: str) -> None:
        """No more forks and no more exit reports: kill the workers (their exits are unknown) and say so."""
        with self._news:
            if self._dead is None:  # the first reason (a template killed by the agent exits next)
                self._dead = reason
            for worker in self._workers.values():
                try:
                    os.killpg(worker.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self._news.notify_all()


def connected_ray() -> Any | None:
    """The ``ray`` module when this process is connected to Ray, else None (never imported, or not
    initialized: any other Ray call there would auto-start a local Ray, as this process's children)."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _dial_host(connect_to: str, token: str, secret_hex: str, node: str) -> socket.socket:
    """The agent's lifeline: a connection to the host's listener, authenticated as a worker's is, with
    TCP keepalive (``LIFELINE_KEEPALIVE_*``). ``RuntimeError`` if it cannot be made."""
    from bridge_child import tcp

    try:
        sock = tcp.connect(
            tcp.split_address(connect_to),
            bytes.fromhex(secret_hex),
            {"token": token, "pid": os.getpid(), "node": node},
        )
    except (OSError, ValueError) as exc:  # tcp.AuthError is a ValueError
        raise RuntimeError(f"the agent cannot reach its host at {connect_to}: {exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", LIFELINE_KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", LIFELINE_KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", LIFELINE_KEEPALIVE_PROBES),
    ):
        if hasattr(socket, option):  # Linux; elsewhere the system's keepalive defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


def _usage(pids: Sequence[int]) -> dict[int, list[float | None]]:
    """Resident bytes and age in seconds of each of ``pids`` on this node (``/proc``)."""
    if not pids:
        return {}
    uptime = uptime_seconds()
    usage: dict[int, list[float | None]] = {}
    for pid in pids:
        start = process_start_seconds(pid)
        age = max(0.0, uptime - start) if start is not None and uptime is not None else None
        usage[pid] = [process_rss_bytes(pid), age]
    return usage
