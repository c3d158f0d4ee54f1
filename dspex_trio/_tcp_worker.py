"""Workers over TCP: the host's worker listener, the ``WorkerProcess`` of a connected worker, and a
launcher that starts local workers which dial back (``python -m bridge_child.tcp``).

A worker that does not run beside its host (a Ray node: ``_ray_launcher``) connects to the host's
:class:`WorkerListener` on the address the operator chose, proves it knows the pool's secret
(challenge-response, HMAC-SHA256, compared in constant time: ``bridge_child.tcp``) and then speaks the
same framed protocol as a stdio worker over the socket. The listener hands each authenticated
connection to the launch that expects its token (a launch expects one token, once); a connection with a
wrong secret, an unknown token, or that says nothing within ``HANDSHAKE_TIMEOUT_S`` is closed and
logged. At most ``MAX_HANDSHAKES`` handshakes run at once; more connections are closed at once.

:class:`TcpWorker` presents the connection as a ``WorkerProcess``: its frames go over the socket; its
pid, exit, signals and stderr come from a *controller* (the local process for :class:`TcpLauncher`, the
node's agent for Ray). So the worker handle's supervision, acks, re-dispatch and health checks work
unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio

from bridge_child import tcp
from dspex_trio._errors import ExitStatus
from dspex_trio._launcher import (
    Launcher,
    SubprocessWorker,
    WorkerProcess,
    WorkerSpec,
    check_env_names,
    worker_environment,
)
from dspex_trio._util import open_service_nursery

logger = logging.getLogger("dspex_trio.tcp")

HANDSHAKE_TIMEOUT_S: Final = 10.0
"""From a connection's accept to a valid answer; past it the connection is closed."""
CONNECT_TIMEOUT_S: Final = 30.0
"""From starting a worker to its authenticated connection (a cold worker imports little before it
connects; a Ray node may first have to start its agent)."""
MAX_HANDSHAKES: Final = 64
"""Connections in their handshake at once; more are closed at once (no one can hold the listener)."""
ACCEPT_RETRY_S: Final = 0.1
"""After a failed ``accept`` (out of file descriptors): the pause before the next one."""
SECRET_BYTES: Final = 32
"""Length of a generated pool secret."""
STDERR_TAIL_BYTES: Final = 4096
"""Of a local worker that exited before connecting: how much of its stderr is quoted."""


class ProcessControl(Protocol):
    """What runs a TCP worker's process: the parts of ``WorkerProcess`` that are not its frames."""

    @property
    def pid(self) -> int: ...

    @property
    def stderr(self) -> trio.abc.ReceiveStream: ...

    def exit_status(self) -> ExitStatus | None: ...

    async def wait(self) -> ExitStatus: ...

    def signal_group(self, signum: int) -> None: ...

    async def aclose(self) -> None: ...


@attrs.frozen
class ProcessUsage:
    """A worker process's figures as read where it runs (a Ray node's agent reads its ``/proc``)."""

    rss_bytes: int | None
    """Resident memory, in bytes (None: unknown)."""
    age_s: float | None
    """Seconds since it started (None: unknown)."""


@attrs.define(eq=False)
class TcpWorker:
    """A connected worker (implements ``WorkerProcess``): frames over ``stream``, the rest by
    ``control``. ``node`` is where it runs (its claim, checked by the secret)."""

    stream: trio.SocketStream
    control: ProcessControl
    node: str = ""

    @property
    def pid(self) -> int:
        return self.control.pid

    @property
    def stdin(self) -> trio.abc.SendStream:
        return self.stream

    @property
    def frames(self) -> trio.abc.ReceiveStream:
        return self.stream

    @property
    def stderr(self) -> trio.abc.ReceiveStream:
        return self.control.stderr

    def exit_status(self) -> ExitStatus | None:
        return self.control.exit_status()

    def usage(self) -> ProcessUsage | None:
        """Its resident memory and age where it runs, if its control knows them (a Ray worker's agent
        reports them); else None."""
        usage = getattr(self.control, "usage", None)
        return usage() if callable(usage) else None

    async def wait(self) -> ExitStatus:
        return await self.control.wait()

    def signal_group(self, signum: int) -> None:
        self.control.signal_group(signum)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
            await self.control.aclose()


@attrs.define(eq=False)
class _Expected:
    """A launch waiting for the connection of its token."""

    send: trio.MemorySendChannel[tuple[trio.SocketStream, dict[str, Any]]]
    receive: trio.MemoryReceiveChannel[tuple[trio.SocketStream, dict[str, Any]]]


@attrs.define(eq=False)
class WorkerListener:
    """The host's listener for TCP workers (made by :func:`open_worker_listener`)."""

    address: tuple[str, int]
    """Where workers connect: (host, port)."""
    secret: bytes = attrs.field(repr=False)
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S
    refused: int = 0
    """Connections closed without being handed to a launch (bad secret, unknown token, silence)."""
    _expected: dict[str, _Expected] = attrs.Factory(dict)
    _handshakes: int = 0

    @property
    def connect_to(self) -> str:
        """``HOST:PORT`` for ``bridge_child.tcp --connect``."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def expect(self, token: str) -> trio.MemoryReceiveChannel[tuple[trio.SocketStream, dict[str, Any]]]:
        """Reserve ``token``: its authenticated connection (and claims) will arrive on the channel
        returned. ``forget(token)`` when done waiting."""
        if token in self._expected:
            raise ValueError(f"token {token!r} is already expected")
        send, receive = trio.open_memory_channel[tuple[trio.SocketStream, dict[str, Any]]](1)
        self._expected[token] = _Expected(send, receive)
        return receive

    def forget(self, token: str) -> None:
        self._expected.pop(token, None)

    async def _serve(self, listeners: list[trio.SocketListener], *, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # out of fds or buffers: wait, as trio.serve_listeners does
                    logger.error("worker listener: accept failed (%s); retrying in %s s", exc, ACCEPT_RETRY_S)
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                if self._handshakes >= MAX_HANDSHAKES:
                    self._refuse(stream, f"more than {MAX_HANDSHAKES} handshakes at once")
                    await trio.aclose_forcefully(stream)
                    continue
                self._handshakes += 1
                nursery.start_soon(self._handshake, stream)

    def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        self.refused += 1
        try:
            peer = stream.socket.getpeername()
        except OSError:
            peer = "?"
        logger.warning("worker connection from %s refused: %s", peer, reason)

    async def _handshake(self, stream: trio.SocketStream) -> None:
        handed = False
        try:
            with trio.move_on_after(self.handshake_timeout) as scope:
                claims = await self._authenticate(stream)
            if scope.cancelled_caught:
                self._refuse(stream, f"no valid handshake within {self.handshake_timeout} s")
                return
            if claims is None:
                return
            expected = self._expected.pop(claims["token"], None)
            if expected is None:
                self._refuse(stream, f"unknown or already connected token {claims['token']!r}")
                return
            try:
                await stream.send_all(tcp.ACCEPT)
                expected.send.send_nowait((stream, claims))
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock) as exc:
                self._refuse(stream, f"gone during the handshake: {exc!r}")
                return
            handed = True
        finally:
            self._handshakes -= 1
            if not handed:
                await trio.aclose_forcefully(stream)

    async def _authenticate(self, stream: trio.SocketStream) -> dict[str, Any] | None:
        nonce = secrets.token_bytes(tcp.NONCE_BYTES)
        try:
            await stream.send_all(tcp.challenge(nonce))
            length = tcp.parse_auth_header(await _receive_exactly(stream, tcp.AUTH_HEADER.size))
            return tcp.verify_auth(self.secret, nonce, await _receive_exactly(stream, length))
        except tcp.AuthError as exc:
            self._refuse(stream, str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as exc:
            self._refuse(stream, f"connection lost during the handshake ({exc!r})")
        return None

    async def accept_worker(
        self,
        token: str,
        receive: trio.MemoryReceiveChannel[tuple[trio.SocketStream, dict[str, Any]]],
        *,
        timeout: float,
        exited: trio.Event | None = None,
    ) -> tuple[trio.SocketStream, dict[str, Any]]:
        """Wait for ``token``'s connection (from :meth:`expect`); ``OSError`` after ``timeout`` s or
        once ``exited`` is set (the process ended before connecting)."""
        result: list[tuple[trio.SocketStream, dict[str, Any]]] = []
        try:
            async with trio.open_nursery() as nursery:

                async def take() -> None:
                    result.append(await receive.receive())
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    if exited is not None:
                        await exited.wait()
                        await trio.lowlevel.checkpoint()  # a connection that made it first still wins
                        nursery.cancel_scope.cancel()

                nursery.start_soon(take)
                nursery.start_soon(watch)
                with trio.move_on_after(timeout):
                    await trio.sleep_forever()
                nursery.cancel_scope.cancel()
        finally:
            self.forget(token)
        if not result:
            if exited is not None and exited.is_set():
                raise OSError(f"worker {token} exited before connecting")
            raise OSError(f"worker {token} did not connect within {timeout} s")
        return result[0]


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError("closed during the handshake")
        data += chunk
    return bytes(data)


def new_secret() -> bytes:
    """A fresh per-pool secret."""
    return secrets.token_bytes(SECRET_BYTES)


@asynccontextmanager
async def open_worker_listener(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    secret: bytes | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> AsyncIterator[WorkerListener]:
    """Listen for TCP workers on ``host:port`` (the address the workers can reach, chosen by the
    operator; port 0 picks a free one), with ``secret`` (a fresh one when None). Leaving the block
    closes the listener; the connections already handed to launches are their workers'."""
    if secret is None:
        secret = new_secret()
    if len(secret) < tcp.MIN_SECRET_BYTES:
        raise ValueError(f"a pool secret is at least {tcp.MIN_SECRET_BYTES} bytes")
    if not math.isfinite(handshake_timeout) or handshake_timeout <= 0:
        raise ValueError("handshake_timeout must be a positive number of seconds")
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    listener = WorkerListener((sockname[0], sockname[1]), secret, handshake_timeout)
    async with open_service_nursery() as nursery:
        await nursery.start(listener._serve, listeners)
        try:
            yield listener
        finally:
            nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class TcpLauncher:
    """Start each worker on this machine as ``<python> -m bridge_child.tcp``, which dials back to
    ``listener``: the TCP path of the Ray launcher without Ray (tests, benchmarks, a host whose workers
    must be reached through a socket). Its stderr is relayed like a stdio worker's."""

    listener: WorkerListener
    python: str = sys.executable
    env: Mapping[str, str] | None = None
    worker_env: Sequence[str] = attrs.field(default=(), converter=check_env_names)
    connect_timeout: float = CONNECT_TIMEOUT_S
    name: str = "tcp"

    def _command(self, token: str) -> list[str]:
        return [
            self.python,
            "-m",
            "bridge_child.tcp",
            "--connect",
            self.listener.connect_to,
            "--token",
            token,
        ]

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        token = f"{spec.worker_id}-{secrets.token_hex(8)}"
        receive = self.listener.expect(token)
        try:
            process = await trio.lowlevel.open_process(
                [*self._command(token), *spec.argv()],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=worker_environment(os.environ, self.worker_env, self.env),
            )
        except BaseException:
            self.listener.forget(token)
            raise
        control = SubprocessWorker(process)
        try:
            await control.stdin.send_all(self.listener.secret.hex().encode() + b"\n")
            exited = trio.Event()
            failure: OSError | None = None
            async with trio.open_nursery() as nursery:

                async def watch_exit() -> None:
                    await process.wait()
                    exited.set()

                nursery.start_soon(watch_exit)
                try:
                    stream, claims = await self.listener.accept_worker(
                        token, receive, timeout=self.connect_timeout, exited=exited
                    )
                except OSError as exc:
                    failure = exc
                nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                control.signal_group(signal.SIGKILL)
                with trio.move_on_after(5):
                    await process.wait()
                tail: bytes | bytearray = b""
                with trio.move_on_after(0.5):
                    tail = await control.stderr.receive_some(STDERR_TAIL_BYTES)
                await control.aclose()
            if isinstance(exc, OSError | trio.BrokenResourceError):
                detail = tail.decode(errors="replace").strip()
                raise OSError(f"{exc}{': ' + detail if detail else ''}") from exc
            raise
        return TcpWorker(stream, control, node=str(claims["node"]))


if TYPE_CHECKING:

    def _implements(worker: TcpWorker, launcher: TcpLauncher, control: SubprocessWorker) -> None:
        _w: WorkerProcess = worker
        _l: Launcher = launcher
        _c: ProcessControl = control
