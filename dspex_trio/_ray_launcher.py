"""Workers on a Ray cluster: :class:`RayLauncher` (the extra ``dspex-trio[ray]``).

Each worker is held by a :class:`WorkerHost` actor that Ray places with the worker's resources
(``num_cpus``, ``num_gpus``, custom ``resources``, a node ``label_selector``; spread across nodes by
default): Ray's placement, GPU assignment and autoscaler see every worker's demand. The actor starts the
worker on its node as ``python -m bridge_child.tcp``, which dials back to the host's
:class:`~dspex_trio._tcp_worker.WorkerListener` on the address the operator chose, authenticates with
the pool's secret and speaks the same framed protocol as a local worker. So the pool's acks,
re-dispatch, supervision, restart budget and circuit behave as locally.

How things end:
- the worker exits (crash, kill, shutdown): its actor reports the exit status, and is killed when the
  handle closes;
- its node is lost: the actor's death is the worker's exit (status unknown); the worker itself exits
  when its actor's process is gone (its stdin lifeline hangs up) or the host's connection is;
- the host is lost: Ray kills the actors its driver owned, and every worker sees its lifeline or its
  connection hang up: nothing is left on any node.

Ray is imported only when a :class:`RayLauncher` is opened: without the extra this module still imports.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from dspex_trio._errors import ExitStatus
from dspex_trio._launcher import Launcher, WorkerProcess, WorkerSpec, check_env_names, worker_environment
from dspex_trio._tcp_worker import (
    CONNECT_TIMEOUT_S,
    TcpWorker,
    WorkerListener,
    open_worker_listener,
)

logger = logging.getLogger("dspex_trio.ray")

INSTALL_HINT: Final = "RayLauncher needs Ray: pip install 'dspex-trio[ray]'"
ACTOR_START_TIMEOUT_S: Final = 60.0
"""From asking Ray for a worker's actor to the actor's answer (Ray may first have to start a worker
process, or its autoscaler a node)."""
KILL_CONFIRM_S: Final = 5.0
"""After a SIGKILL was asked of an actor that does not answer (its node is gone): how long until the
worker counts as exited anyway."""
ACTOR_CONCURRENCY: Final = 4
"""Threads of a worker's actor: its blocking ``wait_exit`` and the signals sent meanwhile."""


class WorkerHost:
    """The Ray actor holding one worker process on its node (Ray places it with the worker's resources).

    Runs on the node, in Ray's worker process: no Trio here. The worker's stdin is a pipe from this
    actor's process: its secret, then its lifeline."""

    def __init__(self, env: Mapping[str, str], worker_env: Sequence[str]) -> None:
        self._env = dict(env)
        self._worker_env = tuple(worker_env)
        self._process: subprocess.Popen[bytes] | None = None

    def node(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "pid": os.getpid()}

    def start(self, connect_to: str, token: str, secret_hex: str, node: str, argv: list[str]) -> int:
        """Start the worker; its pid. It connects to ``connect_to`` by itself."""
        assert self._process is None, "one worker per actor"
        env = worker_environment(os.environ, self._worker_env, self._env)
        for name in ("CUDA_VISIBLE_DEVICES",):  # the GPUs Ray gave this actor are the worker's
            if name in os.environ:
                env[name] = os.environ[name]
        command = [sys.executable, "-m", "bridge_child.tcp", "--connect", connect_to, "--token", token]
        process = subprocess.Popen(
            [*command, "--node", node, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        assert process.stdin is not None
        process.stdin.write(secret_hex.encode() + b"\n")
        process.stdin.flush()  # the pipe stays open: the worker's lifeline
        self._process = process
        return process.pid

    def signal(self, signum: int) -> None:
        if self._process is not None and self._process.returncode is None:
            try:
                os.killpg(self._process.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_exit(self) -> int | None:
        """Block until the worker exits; its return code (negative: the signal)."""
        if self._process is None:
            return None
        code = self._process.wait()
        try:
            os.killpg(self._process.pid, signal.SIGKILL)  # grandchildren left in its group
        except (ProcessLookupError, PermissionError):
            pass
        return code


async def await_ref(ref: Any) -> Any:
    """The value of a Ray ``ObjectRef``, awaited from Trio without a thread (its future's callback
    wakes this task). Cancellation leaves the remote call running."""
    future: concurrent.futures.Future[Any] = ref.future()
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


@attrs.define(eq=False)
class RayControl:
    """A Ray worker's process, seen through its actor (the ``ProcessControl`` of a ``TcpWorker``)."""

    actor: Any
    _pid: int
    _exit: Any
    """The actor's pending ``wait_exit`` reference."""
    _status: ExitStatus | None = None
    _kill_asked: trio.Event = attrs.Factory(trio.Event)
    _stderr: trio.abc.ReceiveStream = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._stderr = _NoStderr()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stderr(self) -> trio.abc.ReceiveStream:
        """Empty: a node's workers write their stderr to the node's Ray logs."""
        return self._stderr

    def exit_status(self) -> ExitStatus | None:
        return self._status

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        status = ExitStatus(code=None, signal=None)
        async with trio.open_nursery() as nursery:

            async def report() -> None:
                nonlocal status
                try:
                    code = await await_ref(self._exit)
                except Exception as exc:  # the actor or its node died: the worker went with it
                    logger.info("worker pid %d: its actor is gone (%s)", self._pid, type(exc).__name__)
                else:
                    if code is not None:
                        status = ExitStatus.from_returncode(code)
                nursery.cancel_scope.cancel()

            async def unanswered_kill() -> None:
                await self._kill_asked.wait()
                await trio.sleep(KILL_CONFIRM_S)
                logger.warning("worker pid %d: no exit report %s s after SIGKILL", self._pid, KILL_CONFIRM_S)
                nursery.cancel_scope.cancel()

            nursery.start_soon(report)
            nursery.start_soon(unanswered_kill)
        if self._status is None:
            self._status = status
        return self._status

    def signal_group(self, signum: int) -> None:
        try:
            self.actor.signal.remote(signum)
        except Exception as exc:  # the actor is gone
            logger.debug("signal to worker pid %d not sent: %r", self._pid, exc)
        if signum == signal.SIGKILL:
            self._kill_asked.set()

    async def aclose(self) -> None:
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception as exc:  # already gone
            logger.debug("actor of worker pid %d: %r", self._pid, exc)


class _NoStderr(trio.abc.ReceiveStream):
    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class RayLauncher:
    """Start each worker on a Ray cluster (see the module doc). Use it as an async context manager, then
    pass it to ``open_pool(launcher=...)``::

        async with RayLauncher(address="auto", listen_host="10.0.0.5") as launcher:
            async with dspex_trio.open_pool(launcher=launcher, workers=8) as pool:
                ...

    Entering connects to Ray (``ray.init(address)`` unless this process is already connected) and opens
    the worker listener on ``listen_host:listen_port`` (an address every node can reach: the operator
    chooses it; nothing else is listened on). Leaving closes the listener (close the pool first)."""

    address: str | None = "auto"
    """Ray's address: "auto" (a cluster started on this machine by ``ray start``), "ray://HOST:PORT"
    (Ray Client), "HOST:PORT" (the GCS); None starts a local Ray instance."""
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    num_cpus: float = 1.0
    """Ray CPUs reserved per worker."""
    num_gpus: float = 0.0
    """Ray GPUs reserved per worker (the worker sees them through ``CUDA_VISIBLE_DEVICES``)."""
    resources: Mapping[str, float] = attrs.field(factory=dict)
    """Custom Ray resources reserved per worker."""
    label_selector: Mapping[str, str] = attrs.field(factory=dict)
    """Node labels a worker's node must have (Ray's ``label_selector``)."""
    spread: bool = True
    """Place workers with Ray's ``SPREAD`` strategy (else Ray's default packing)."""
    env: Mapping[str, str] | None = None
    worker_env: Sequence[str] = attrs.field(default=(), converter=check_env_names)
    """Variables of each node's environment its workers get besides the allow-list."""
    connect_timeout: float = CONNECT_TIMEOUT_S
    start_timeout: float = ACTOR_START_TIMEOUT_S
    ray_init: Mapping[str, Any] = attrs.field(factory=dict)
    """Extra keyword arguments of ``ray.init``."""
    name: str = "ray"
    listener: WorkerListener | None = None
    """The worker listener, while open."""
    _actor_class: Any = None
    _context: Any = None

    def __attrs_post_init__(self) -> None:
        for what, value in (
            ("num_cpus", self.num_cpus),
            ("num_gpus", self.num_gpus),
            *self.resources.items(),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{what} must be a non-negative number, not {value!r}")

    async def __aenter__(self) -> RayLauncher:
        self._context = self._open()
        return await self._context.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        context, self._context = self._context, None
        result: bool | None = await context.__aexit__(*exc_info)
        return result

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[RayLauncher]:
        try:
            import ray
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, "include_dashboard": False, **self.ray_init}
            await trio.to_thread.run_sync(lambda: ray.init(address=self.address, **kwargs))
        self._actor_class = ray.remote(WorkerHost)
        async with open_worker_listener(self.listen_host, self.listen_port) as listener:
            self.listener = listener
            try:
                yield self
            finally:
                self.listener = None

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_concurrency": ACTOR_CONCURRENCY,
            "max_restarts": 0,
        }
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.label_selector:
            options["label_selector"] = dict(self.label_selector)
        if self.spread:
            options["scheduling_strategy"] = "SPREAD"
        return options

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        import ray

        listener = self.listener
        if listener is None:
            raise RuntimeError("RayLauncher is not open: use it as `async with RayLauncher(...) as launcher`")
        token = f"{spec.worker_id}-{secrets.token_hex(8)}"
        receive = listener.expect(token)
        actor = self._actor_class.options(**self._options()).remote(self.env or {}, self.worker_env)
        try:
            with trio.fail_after(self.start_timeout):
                node = await await_ref(actor.node.remote())
            pid_ref = actor.start.remote(
                listener.connect_to, token, listener.secret.hex(), node["node_id"], spec.argv()
            )
            with trio.fail_after(self.start_timeout):
                pid = await await_ref(pid_ref)
            exit_ref = actor.wait_exit.remote()
            exited = trio.Event()
            failure: OSError | None = None
            async with trio.open_nursery() as nursery:

                async def watch_exit() -> None:
                    try:
                        await await_ref(exit_ref)
                    except Exception:
                        pass
                    exited.set()

                nursery.start_soon(watch_exit)
                try:
                    stream, claims = await listener.accept_worker(
                        token, receive, timeout=self.connect_timeout, exited=exited
                    )
                except OSError as exc:
                    failure = exc
                nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
        except (trio.TooSlowError, OSError, ray.exceptions.RayError) as exc:
            listener.forget(token)
            ray.kill(actor, no_restart=True)
            raise OSError(f"worker {spec.worker_id} could not start on Ray: {exc!r}") from exc
        except BaseException:
            listener.forget(token)
            ray.kill(actor, no_restart=True)
            raise
        if claims["pid"] != pid:
            logger.warning(
                "worker %s: claims pid %s, its actor started %s", spec.worker_id, claims["pid"], pid
            )
        return TcpWorker(stream, RayControl(actor, pid, exit_ref), node=str(claims["node"]))


if TYPE_CHECKING:

    def _implements(launcher: RayLauncher) -> Launcher:
        return launcher
