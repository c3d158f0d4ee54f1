"""Workers on a Ray cluster: :class:`RayLauncher` (the extra ``dspex-trio[ray]``).

One **agent** actor per node (``dspex_trio._ray_agent.NodeAgent``, pinned to its node, no resources of
its own) runs a zygote template there: dspy, trio and the operator's program modules are imported once
per node, and the node's workers are forked from it in milliseconds. Each worker dials back to the
host's :class:`~dspex_trio._tcp_worker.WorkerListener` on the address the operator chose, authenticates
with the pool's secret and speaks the same framed protocol as a local worker; so the pool's acks,
re-dispatch, supervision, restart budget and circuit behave as locally.

Placement: each worker reserves its resources (``num_cpus``, ``num_gpus``, custom ``resources``, a
node ``label_selector``) as a one-bundle Ray placement group, which Ray's scheduler and autoscaler
see; its node is the bundle's. With ``spread`` (the default) each new worker's bundle is aimed at the
alive node with the fewest of this launcher's workers among those that could host it
(``could_host``). A worker's bundle is kept ``PLACEMENT_LINGER_S`` after it exits, for its replacement
on the same node, then removed.
When the bundle holds GPUs (or other accelerators), the worker gets the ids Ray assigned to it
(``CUDA_VISIBLE_DEVICES``...: ``dspex_trio._ray_accelerators``), not its node's.

What the host learns of a worker's process comes from its agent, one long poll per agent
(:meth:`NodeAgent.poll`): its exit status, and its stderr (bounded by the agent: per worker at most
``STDERR_BUFFER_BYTES`` between polls and ``STDERR_BYTES_PER_S``), which the worker handle re-logs under
the worker's id like a local worker's.

How things end:
- a worker exits (crash, kill, shutdown): its node's template reaps it, the agent reports the status;
- an agent is killed, or its node is lost: its workers see their lifeline (a pipe from the agent) hang
  up and exit with their process groups; the host's poll fails, so each of them counts as exited
  (status unknown), and the next start on that node makes a new agent;
- the host is lost: every agent's *lifeline* (a TCP connection it dialed to this host's worker
  listener, authenticated with the pool's secret, on which nothing is sent) reaches EOF, and the agent
  kills its template and workers, removes their placement groups and ends its actor: nothing is left
  on any node, even through Ray Client (whose server keeps a lost client's actors and placement groups
  for its reconnect grace period). A driver host's
  agents are also killed by Ray (it kills the actors a driver owned). The launcher holds each agent's
  lifeline as long as the agent serves it, and closes it when it drops the agent or leaves.

Agents live as long as the launcher (so a restarted or added worker starts warm); leaving the launcher
kills them. Ray is imported only when a :class:`RayLauncher` is opened: without the extra this module
still imports.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import secrets
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from dspex_trio._errors import ExitStatus
from dspex_trio._launcher import Launcher, WorkerProcess, WorkerSpec, check_env_names
from dspex_trio._ray_accelerators import accelerator_resources, visible_accelerators
from dspex_trio._ray_agent import AGENT_CONCURRENCY, LIFELINE_DROP, NodeAgent, connected_ray
from dspex_trio._tcp_worker import (
    CONNECT_TIMEOUT_S,
    ProcessUsage,
    TcpWorker,
    WorkerListener,
    open_worker_listener,
)
from dspex_trio._util import open_service_nursery

logger = logging.getLogger("dspex_trio.ray")

INSTALL_HINT: Final = "RayLauncher needs Ray: pip install 'dspex-trio[ray]'"
ACTOR_START_TIMEOUT_S: Final = 60.0
"""From asking Ray for a worker's placement (or a node's agent: it starts a template that imports
dspy) to its answer (Ray's autoscaler may first have to add a node)."""
KILL_CONFIRM_S: Final = 5.0
"""After a SIGKILL was asked of a worker whose agent does not answer (its node is gone): how long until
the worker counts as exited anyway."""
POLL_S: Final = 5.0
"""Longest wait of one poll of an agent (a poll returns as soon as there is news)."""
PLACEMENT_LINGER_S: Final = 5.0
"""How long an exited worker's placement group is kept for a replacement on its node."""
LIFELINE_READ_BYTES: Final = 64
"""Most bytes read at a time from an agent's lifeline (an agent sends nothing on it)."""
LIFELINE_DROP_TIMEOUT_S: Final = 1.0
"""Longest wait to send ``LIFELINE_DROP`` to an agent dropped (then its lifeline is closed anyway)."""
STDERR_CHUNKS: Final = 64
"""Stderr chunks (each at most the agent's ``STDERR_BUFFER_BYTES``) queued per worker on the host;
more are dropped (and counted in ``RayControl.stderr_dropped``)."""


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


class _ChunkStream(trio.abc.ReceiveStream):
    """A worker's stderr on the host: the chunks its agent relayed, then EOF."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes]) -> None:
        self._receive = receive
        self._buffer = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._buffer:
            try:
                self._buffer = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
        else:
            await trio.lowlevel.checkpoint()
        size = len(self._buffer) if max_bytes is None else max_bytes
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    async def aclose(self) -> None:
        await self._receive.aclose()


@attrs.define(eq=False)
class RayControl:
    """A Ray worker's process, seen through its node's agent (the ``ProcessControl`` of a ``TcpWorker``)."""

    agent: _Agent
    _pid: int
    on_close: Any = None
    """Called once by ``aclose`` (the launcher releases the worker's placement)."""
    _status: ExitStatus | None = None
    _exited: trio.Event = attrs.Factory(trio.Event)
    _kill_asked: trio.Event = attrs.Factory(trio.Event)
    _stderr_ended: bool = False
    _closed: bool = False
    stderr_dropped: int = 0
    """Stderr chunks dropped on the host (the worker handle did not keep up)."""
    _usage: tuple[int | None, float | None, float] | None = None
    """Its resident bytes and age as its agent last read them, and when (Trio's clock)."""
    _stderr_send: trio.MemorySendChannel[bytes] = attrs.field(init=False)
    _stderr: _ChunkStream = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        send, receive = trio.open_memory_channel[bytes](STDERR_CHUNKS)
        self._stderr_send = send
        self._stderr = _ChunkStream(receive)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def stderr(self) -> trio.abc.ReceiveStream:
        """What the worker writes to stderr (and fd 1), relayed by its agent (bounded: module doc)."""
        return self._stderr

    @property
    def exited(self) -> trio.Event:
        """Set once the worker's exit is known (reported, or its agent is gone)."""
        return self._exited

    def exit_status(self) -> ExitStatus | None:
        return self._status

    def set_usage(self, rss_bytes: int | None, age_s: float | None) -> None:
        """Its agent read its resident memory and age on its node (``NodeAgent.poll``)."""
        self._usage = (rss_bytes, age_s, trio.current_time())

    def usage(self) -> ProcessUsage | None:
        """Its resident memory and age, as its agent last reported them (the age brought up to now);
        None before the first report or once it exited."""
        if self._usage is None or self._status is not None:
            return None
        rss_bytes, age_s, at = self._usage
        return ProcessUsage(
            rss_bytes=rss_bytes,
            age_s=None if age_s is None else age_s + max(0.0, trio.current_time() - at),
        )

    def stderr_data(self, data: bytes) -> None:
        try:
            self._stderr_send.send_nowait(data)
        except trio.WouldBlock:
            self.stderr_dropped += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    @property
    def stderr_ended(self) -> bool:
        """True once its agent said its stderr ended (or is gone)."""
        return self._stderr_ended

    def stderr_eof(self) -> None:
        self._stderr_ended = True
        self._stderr_send.close()

    def set_exit(self, code: int | None) -> None:
        """Its agent reported the exit (``code``: a return code, negative for a signal), or is gone (None)."""
        if self._status is None:
            self._status = (
                ExitStatus(code=None, signal=None) if code is None else ExitStatus.from_returncode(code)
            )
        self._exited.set()

    async def wait(self) -> ExitStatus:
        if self._status is None:
            async with trio.open_nursery() as nursery:

                async def exited() -> None:
                    await self._exited.wait()
                    nursery.cancel_scope.cancel()

                async def unanswered_kill() -> None:
                    await self._kill_asked.wait()
                    await trio.sleep(KILL_CONFIRM_S)
                    logger.warning(
                        "worker pid %d: no exit report %s s after SIGKILL", self._pid, KILL_CONFIRM_S
                    )
                    nursery.cancel_scope.cancel()

                nursery.start_soon(exited)
                nursery.start_soon(unanswered_kill)
            self.set_exit(None)  # no-op if reported
        assert self._status is not None
        return self._status

    def signal_group(self, signum: int) -> None:
        if self._status is None:
            try:
                self.agent.actor.signal.remote(self._pid, signum)
            except Exception as exc:  # the agent is gone
                logger.debug("signal to worker pid %d not sent: %r", self._pid, exc)
        if signum == signal.SIGKILL:
            self._kill_asked.set()

    async def aclose(self) -> None:
        """Stop relaying its stderr, make sure it is gone (SIGKILL if its exit is not known) and release
        its placement. Does not wait."""
        with trio.CancelScope(shield=True):
            on_close, self.on_close = self.on_close, None
            if self._closed:
                await trio.lowlevel.checkpoint()
                return
            self._closed = True
            if self._status is None:
                self.signal_group(signal.SIGKILL)
            self._stderr_send.close()
            await self._stderr.aclose()
            if on_close is not None:
                on_close()


@attrs.define(eq=False)
class _Agent:
    """A node's agent, as the launcher sees it."""

    actor: Any
    node_id: str
    programs: tuple[str, ...]
    ready: trio.Event = attrs.Factory(trio.Event)
    failure: str | None = None
    info: dict[str, Any] = attrs.Factory(dict)
    controls: dict[int, RayControl] = attrs.Factory(dict)
    early: dict[int, list[tuple[str, Any]]] = attrs.Factory(dict)
    """News for a pid spawned but not registered yet (the spawn's answer and a poll raced)."""
    lost: str | None = None
    """Why the agent is gone (None while it serves)."""
    lifeline: trio.CancelScope = attrs.Factory(trio.CancelScope)
    """Holds the agent's lifeline open (``RayLauncher._hold_lifeline``); cancelled, it closes it."""

    def register(self, control: RayControl) -> None:
        self.controls[control.pid] = control
        for what, value in self.early.pop(control.pid, []):
            self._deliver(control, what, value)
        if self.lost is not None:
            control.stderr_eof()
            control.set_exit(None)

    def _deliver(self, control: RayControl, what: str, value: Any) -> None:
        if what == "stderr":
            control.stderr_data(value)
        elif what == "eof":
            control.stderr_eof()
        else:
            control.set_exit(value)
        if control.exited.is_set() and control.stderr_ended:  # both seen: nothing more will come
            self.controls.pop(control.pid, None)

    def _news(self, pid: int, what: str, value: Any) -> None:
        control = self.controls.get(pid)
        if control is None:
            self.early.setdefault(pid, []).append((what, value))
        else:
            self._deliver(control, what, value)

    async def pump(self) -> None:
        """Relay the agent's news until it is gone (then its workers count as exited)."""
        reason = "stopped"
        try:
            while True:
                try:
                    news = await await_ref(self.actor.poll.remote(POLL_S))
                except Exception as exc:  # Ray's ActorDiedError, RayActorError...: it is gone
                    reason = f"the agent is gone ({type(exc).__name__})"
                    break
                for pid, data in news["stderr"].items():
                    self._news(pid, "stderr", data)
                for pid in news["eof"]:
                    self._news(pid, "eof", None)
                for pid, code in news["exits"].items():
                    self._news(pid, "exit", code)
                for pid, (rss_bytes, age_s) in news.get("usage", {}).items():
                    control = self.controls.get(pid)
                    if control is not None:
                        control.set_usage(rss_bytes, age_s)
                if news["dead"]:
                    reason = f"its template is gone: {news['dead']}"
                    break
        finally:
            self.gone(reason)

    def gone(self, reason: str) -> None:
        """The agent serves no more: its workers count as exited, and its actor is killed (if it still
        runs: a template that died alone leaves its agent up)."""
        if self.lost is None:
            self.lost = reason
            self.lifeline.cancel()
            _kill(self.actor)
            if self.controls:
                logger.warning(
                    "agent on node %s: %s; its %d worker(s) are lost",
                    self.node_id,
                    reason,
                    len(self.controls),
                )
        for control in list(self.controls.values()):
            control.stderr_eof()
            control.set_exit(None)
        self.controls.clear()
        self.early.clear()


@attrs.define(eq=False)
class _Placement:
    """A worker's reservation: a one-bundle placement group (None when it reserves nothing)."""

    group: Any
    node_id: str
    released_at: float | None = None
    env: dict[str, str] = attrs.Factory(dict)
    """The variables of the accelerators Ray assigned to the bundle (``dspex_trio._ray_accelerators``),
    set in the worker's environment."""


@attrs.define(eq=False)
class RayLauncher:
    """Start each worker on a Ray cluster (see the module doc). Use it as an async context manager, then
    pass it to ``open_pool(launcher=...)``::

        async with RayLauncher(address="auto", listen_host="10.0.0.5") as launcher:
            async with dspex_trio.open_pool(launcher=launcher, workers=8) as pool:
                ...

    Entering connects to Ray (``ray.init(address)`` unless this process is already connected) and opens
    the worker listener on ``listen_host:listen_port`` (an address every node can reach: the operator
    chooses it; nothing else is listened on). Leaving kills the node agents, releases the placements and
    closes the listener (close the pool first)."""

    address: str | None = "auto"
    """Ray's address: "auto" (a cluster started on this machine by ``ray start``), "ray://HOST:PORT"
    (Ray Client), "HOST:PORT" (the GCS); None starts a local Ray instance."""
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    num_cpus: float = 1.0
    """Ray CPUs reserved per worker."""
    num_gpus: float = 0.0
    """Ray GPUs reserved per worker; the worker sees only its own (``CUDA_VISIBLE_DEVICES``: the ids
    Ray assigned to its reservation)."""
    resources: Mapping[str, float] = attrs.field(factory=dict)
    """Custom Ray resources reserved per worker."""
    label_selector: Mapping[str, str] = attrs.field(factory=dict)
    """Node labels a worker's node must have (Ray's ``label_selector``)."""
    spread: bool = True
    """Aim each new worker at the alive node with the fewest of this launcher's workers among those that
    could host it (``could_host``; else Ray places its bundle where it likes)."""
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
    _agent_class: Any = None
    _probe: Any = attrs.field(default=None, init=False)
    _context: Any = None
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _agents: dict[tuple[str, tuple[str, ...]], _Agent] = attrs.field(factory=dict, init=False)
    _live: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)
    """This launcher's running workers, by node."""
    _free: list[_Placement] = attrs.field(factory=list, init=False)
    """Placements of exited workers, kept ``PLACEMENT_LINGER_S`` for a replacement."""

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

    @property
    def agents(self) -> dict[str, dict[str, Any]]:
        """The node agents running: node id -> what the agent said when ready (its pid, its template's
        pid, how long the template's preload took)."""
        return {
            agent.node_id: dict(agent.info)
            for agent in self._agents.values()
            if agent.ready.is_set() and agent.lost is None and not agent.failure
        }

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[RayLauncher]:
        try:
            import ray
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, "include_dashboard": False, **self.ray_init}
            await trio.to_thread.run_sync(lambda: ray.init(address=self.address, **kwargs))
        self._agent_class = ray.remote(NodeAgent)
        self._probe = ray.remote(visible_accelerators)
        async with (
            open_worker_listener(self.listen_host, self.listen_port) as listener,
            open_service_nursery() as nursery,
        ):
            self.listener = listener
            self._nursery = nursery
            nursery.start_soon(self._remove_lingering)
            try:
                yield self
            finally:
                self.listener = None
                self._nursery = None
                for agent in self._agents.values():
                    _kill(agent.actor)
                self._agents.clear()
                for placement in self._free:
                    _remove(placement)
                self._free.clear()
                nursery.cancel_scope.cancel()

    # -- placement -------------------------------------------------------------------------------------
    def _bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {name: float(amount) for name, amount in bundle.items() if amount}

    async def _place(self) -> _Placement:
        """A reservation for one worker, on the node it should go to (``OSError`` if Ray cannot place it
        within ``start_timeout``), counted in ``_live`` at once (so concurrent starts spread) until
        ``_release``."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        nodes = [n for n in await trio.to_thread.run_sync(ray.nodes) if n["Alive"]]
        alive = [n["NodeID"] for n in nodes]
        if not alive:
            raise OSError("no Ray node is alive")
        bundle = self._bundle()
        # aim at a node that could host the bundle at all (its GPUs, its labels): else the target is
        # a node Ray must refuse, and a lingering reservation on the right node is never reused
        able = [n["NodeID"] for n in nodes if could_host(n, bundle, self.label_selector)] or alive
        target = min(able, key=lambda node: self._live[node]) if self.spread else None
        for placement in self._free:  # a lingering reservation on the node wanted
            if placement.node_id in alive and (target is None or placement.node_id == target):
                self._free.remove(placement)
                placement.released_at = None
                self._live[placement.node_id] += 1
                return placement
        if not bundle:  # nothing to reserve: the node is ours to choose
            self._live[target or alive[0]] += 1
            return _Placement(None, target or alive[0])
        options: dict[str, Any] = {"strategy": "STRICT_PACK"}
        if target is not None:
            options["_soft_target_node_id"] = target
        if self.label_selector:
            options["bundle_label_selector"] = [dict(self.label_selector)]
        group = placement_group([bundle], **options)
        timeout = self.start_timeout

        def wait() -> str | None:
            if not group.wait(timeout):
                return None
            return str(placement_group_table(group)["bundles_to_node_id"][0])

        planned = target or ""
        self._live[planned] += 1  # counted before the wait: concurrent starts aim elsewhere
        try:
            node = await trio.to_thread.run_sync(wait, abandon_on_cancel=True)
        except BaseException:
            self._uncount(planned)
            remove_placement_group(group)
            raise
        self._uncount(planned)
        if node is None:
            remove_placement_group(group)
            raise OSError(f"Ray could not place a worker's bundle {bundle} within {timeout} s")
        self._live[node] += 1
        placement = _Placement(group, node)
        try:
            placement.env = await self._accelerators(group, bundle)
        except BaseException:
            self._uncount(node)
            remove_placement_group(group)
            raise
        return placement

    async def _accelerators(self, group: Any, bundle: Mapping[str, float]) -> dict[str, str]:
        """The accelerator variables Ray sets for the devices of ``group``'s bundle (``{}`` if it holds
        none): reported by a task run in the bundle with them (``dspex_trio._ray_accelerators``)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        wanted = accelerator_resources(bundle)
        if not wanted:
            return {}
        gpus = wanted.pop("GPU", 0.0)
        probe = self._probe.options(
            num_cpus=0,
            num_gpus=gpus,
            resources=wanted,
            max_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        )
        env: dict[str, str] = await await_ref(probe.remote())
        return env

    def _uncount(self, node_id: str) -> None:
        self._live[node_id] -= 1
        if self._live[node_id] <= 0:
            del self._live[node_id]

    def _release(self, placement: _Placement) -> None:
        self._uncount(placement.node_id)
        if placement.group is None:
            return
        if self._nursery is None:  # the launcher is closed (or closing)
            _remove(placement)
            return
        placement.released_at = trio.current_time()
        self._free.append(placement)

    async def _remove_lingering(self) -> None:
        while True:
            await trio.sleep(PLACEMENT_LINGER_S / 2)
            now = trio.current_time()
            for placement in [
                p for p in self._free if p.released_at and now - p.released_at >= PLACEMENT_LINGER_S
            ]:
                self._free.remove(placement)
                _remove(placement)

    # -- agents ----------------------------------------------------------------------------------------
    async def _agent(self, node_id: str, programs: tuple[str, ...]) -> _Agent:
        """The agent of ``node_id`` for ``programs``, started if needed (``OSError`` if it cannot be)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        key = (node_id, programs)
        agent = self._agents.get(key)
        if agent is None or agent.lost is not None or agent.failure is not None:
            listener = self.listener
            assert listener is not None
            token = f"agent-{secrets.token_hex(8)}"
            receive = listener.expect(token)
            lifeline = (listener.connect_to, token, listener.secret.hex(), node_id)
            actor = self._agent_class.options(
                num_cpus=0,
                max_concurrency=AGENT_CONCURRENCY,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(self.env or {}, self.worker_env, programs, lifeline)
            agent = self._agents[key] = _Agent(actor, node_id, programs)
            try:
                with trio.fail_after(self.start_timeout):
                    agent.info = await await_ref(actor.ready.remote())
                    # it dialed before it answered: its connection is queued for the token already
                    stream, _ = await listener.accept_worker(token, receive, timeout=self.connect_timeout)
            except BaseException as exc:
                agent.failure = repr(exc)
                if self._agents.get(key) is agent:
                    del self._agents[key]
                _kill(actor)
                agent.ready.set()
                if isinstance(exc, Exception):
                    raise OSError(f"the agent of node {node_id} could not start: {exc!r}") from exc
                raise
            finally:
                listener.forget(token)
                with trio.CancelScope(shield=True):  # a connection queued but not taken: closed
                    while (queued := _take_queued(receive)) is not None:
                        await trio.aclose_forcefully(queued)
            agent.ready.set()
            assert self._nursery is not None
            self._nursery.start_soon(self._hold_lifeline, agent, stream)
            self._nursery.start_soon(agent.pump)
            logger.info("agent on node %s ready: %s", node_id, agent.info)
        else:
            await agent.ready.wait()
            if agent.failure is not None:
                raise OSError(f"the agent of node {node_id} could not start: {agent.failure}")
        return agent

    async def _hold_lifeline(self, agent: _Agent, stream: trio.SocketStream) -> None:
        """Keep ``agent``'s lifeline open until the agent is dropped (``_Agent.gone``: ``LIFELINE_DROP``
        is sent first, so the agent leaves its workers' placement groups to this launcher) or the
        launcher leaves; closing it tells the agent to end. Its end from the agent's side means the
        agent is gone."""
        try:
            with agent.lifeline:
                try:
                    while await stream.receive_some(LIFELINE_READ_BYTES):
                        pass  # an agent sends nothing; anything is ignored
                    reason = "its lifeline reached EOF"
                except trio.BrokenResourceError as exc:
                    reason = f"its lifeline failed ({exc!r})"
                agent.gone(f"the agent is gone: {reason}")
                return
            with trio.move_on_after(LIFELINE_DROP_TIMEOUT_S):  # dropped: say so, if it still listens
                try:
                    await stream.send_all(LIFELINE_DROP)
                except trio.BrokenResourceError:
                    pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def launch(self, spec: WorkerSpec) -> WorkerProcess:
        import ray

        listener = self.listener
        if listener is None:
            raise RuntimeError("RayLauncher is not open: use it as `async with RayLauncher(...) as launcher`")
        token = f"{spec.worker_id}-{secrets.token_hex(8)}"
        receive = listener.expect(token)
        placement: _Placement | None = None
        control: RayControl | None = None
        try:
            with trio.fail_after(self.start_timeout):
                placement = await self._place()
            agent = await self._agent(placement.node_id, spec.programs)
            spawn = agent.actor.spawn.remote(
                listener.connect_to,
                token,
                listener.secret.hex(),
                placement.node_id,
                spec.argv(),
                placement.env,
                None if placement.group is None else placement.group.id.hex(),
            )
            try:
                with trio.fail_after(self.start_timeout):
                    pid = await await_ref(spawn)
            except (
                ray.exceptions.RayActorError
            ) as exc:  # before its pump noticed: the next start makes a new one
                agent.gone(f"the agent is gone ({type(exc).__name__})")
                raise
            held, placement = placement, None
            control = RayControl(agent, pid, on_close=lambda: self._release(held))
            agent.register(control)
            stream, claims = await listener.accept_worker(
                token, receive, timeout=self.connect_timeout, exited=control.exited
            )
        except BaseException as exc:
            listener.forget(token)
            with trio.CancelScope(shield=True):
                if control is not None:
                    await control.aclose()
                elif placement is not None:
                    self._release(placement)
            if isinstance(exc, trio.TooSlowError | OSError | ray.exceptions.RayError):
                raise OSError(f"worker {spec.worker_id} could not start on Ray: {exc!r}") from exc
            raise
        if claims["pid"] != pid:
            logger.warning(
                "worker %s: claims pid %s, its agent forked %s", spec.worker_id, claims["pid"], pid
            )
        return TcpWorker(stream, control, node=str(claims["node"]))


def could_host(
    node: Mapping[str, Any], bundle: Mapping[str, float], label_selector: Mapping[str, str]
) -> bool:
    """Whether a node (an entry of ``ray.nodes()``) could host ``bundle`` when free: it has that much of
    every resource in all, and the labels ``label_selector`` asks for (Ray's syntax: ``value``,
    ``!value``, ``in(a, b)``, ``!in(a, b)``)."""
    resources = node.get("Resources") or {}
    if any(resources.get(name, 0.0) < amount for name, amount in bundle.items()):
        return False
    labels = node.get("Labels") or {}
    return all(_label_matches(labels.get(key), wanted) for key, wanted in label_selector.items())


def _label_matches(value: str | None, wanted: str) -> bool:
    negated = wanted.startswith("!")
    wanted = wanted[1:] if negated else wanted
    if wanted.startswith("in(") and wanted.endswith(")"):
        matches = value in {v.strip() for v in wanted[3:-1].split(",")}
    else:
        matches = value == wanted
    return matches != negated


def _take_queued(
    receive: trio.MemoryReceiveChannel[tuple[trio.SocketStream, Any]],
) -> trio.SocketStream | None:
    try:
        return receive.receive_nowait()[0]
    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
        return None


def _kill(actor: Any) -> None:
    ray = connected_ray()
    if ray is None:  # no actor of Ray's to kill (tests' fake actors); ``ray.kill`` would start a Ray
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # already gone
        logger.debug("ray.kill: %r", exc)


def _remove(placement: _Placement) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(placement.group)
    except Exception as exc:  # already gone
        logger.debug("remove_placement_group: %r", exc)


if TYPE_CHECKING:

    def _implements(launcher: RayLauncher) -> Launcher:
        return launcher
