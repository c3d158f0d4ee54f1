"""A node agent's lifeline to its host (``NodeAgent(lifeline=...)``, ``RayLauncher._hold_lifeline``),
without Ray: the agent runs in this process (as in ``test_ray_agent.py``) and dials this process's worker
listener. Checked: the agent authenticates its lifeline with the pool's secret (a wrong one: refused, no
template started); when the host's end closes (EOF, as when the host's process dies), the agent kills its
workers and its template and asks to end its actor; a host that is only stalled (its event loop blocked)
is not taken for dead; when the agent's end closes, the launcher drops that agent. The same on a real Ray
cluster through Ray Client (a host SIGKILLed): ``test_ray.py``."""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from collections.abc import AsyncIterator

import attrs
import pytest
import trio

import dspex_trio
from dspex_trio._launcher import WorkerSpec
from dspex_trio._ray_agent import EXITED_GROUP_KEEP_S, MAX_EXITED_GROUPS, NodeAgent
from dspex_trio._ray_launcher import RayLauncher, _Agent
from dspex_trio._tcp_worker import TcpWorker, WorkerListener, open_worker_listener
from tests.dspex_trio.test_ray_agent import AgentLauncher, LocalActor, _parent, _wait
from tests.helpers import pid_alive, wait_until

pytestmark = pytest.mark.real_processes

STALL_S = 3.0
"""How long the host's event loop is blocked in the stall test (real time)."""


class RecordingAgent(NodeAgent):
    """An agent that records its request to end its actor, and the placement groups it removes, instead
    of asking Ray."""

    exit_asked = False
    removed: set[str] | None = None

    def _exit_actor(self) -> None:
        self.exit_asked = True

    def _remove_groups(self, groups: set[str]) -> None:
        self.removed = groups


class FailingLauncher(AgentLauncher):
    """Its spawns fail as ``OSError`` once the agent's template is gone (``RayLauncher`` does the same
    with Ray's errors), so the pool's replacements fail to start rather than crash the pool."""

    async def launch(self, spec: WorkerSpec) -> TcpWorker:
        try:
            return await super().launch(spec)
        except RuntimeError as exc:
            raise OSError(str(exc)) from exc


@attrs.define
class Hosted:
    agent: RecordingAgent
    handle: _Agent
    launcher: AgentLauncher
    stream: trio.SocketStream
    """The host's end of the agent's lifeline."""
    listener: WorkerListener


@pytest.fixture
async def hosted() -> AsyncIterator[Hosted]:
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        async with open_worker_listener() as listener, trio.open_nursery() as nursery:
            token = f"agent-{secrets.token_hex(4)}"
            receive = listener.expect(token)
            lifeline = (listener.connect_to, token, listener.secret.hex(), "node-test")
            node_agent = await trio.to_thread.run_sync(RecordingAgent, {}, (), (), lifeline)
            try:
                stream, claims = await listener.accept_worker(token, receive, timeout=30)
                assert claims["node"] == "node-test" and claims["pid"] > 0, claims
                handle = _Agent(LocalActor(node_agent, threads), "node-test", ())
                nursery.start_soon(handle.pump)
                yield Hosted(node_agent, handle, FailingLauncher(handle, listener), stream, listener)
                nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    node_agent.close()
                    await trio.to_thread.run_sync(_wait, node_agent._template, 30)
                    await stream.aclose()


async def test_the_hosts_end_closing_ends_the_agents_workers_and_template(hosted: Hosted) -> None:
    agent = hosted.agent
    template = agent.ready()["template_pid"]
    with trio.fail_after(120):
        async with dspex_trio.open_pool(
            workers=2, launcher=hosted.launcher, restart_intensity=0, diagnostics=True
        ) as pool:
            pids = [w.pid for w in pool.statistics().workers]
            assert all(_parent(pid) == template for pid in pids), pids  # forked by the template
            assert await pool.call("echo", {"value": 1}) == 1
            assert agent.host_lost is None and not agent.exit_asked
            # the host's process dies: its kernel closes its end (here: this process closes it)
            await hosted.stream.aclose()
            everything = [template, *pids]
            await wait_until(
                lambda: not any(pid_alive(pid) for pid in everything),
                30,
                lambda: f"alive: {[pid for pid in everything if pid_alive(pid)]}, lost: {agent.host_lost}",
            )
            await wait_until(lambda: agent.exit_asked, 30, "the agent did not ask to end its actor")
            assert agent.host_lost is not None and "EOF" in agent.host_lost, agent.host_lost
            assert not agent.dropped  # so it removes its workers' placement groups (in Ray)


async def test_the_host_gone_removes_the_groups_of_workers_that_exited_just_before(hosted: Hosted) -> None:
    """A host that dies makes its workers exit (their connections to it end), and a ``poll`` of the
    host's may still run in the agent (Ray finishes an actor's call whatever became of its caller),
    which forgets the exited workers, before the agent's lifeline thread learns that the host is gone
    (it happened on a loaded machine through Ray Client: the reservations outlived the host). The
    agent removes the groups of the workers that exited lately too, not only its running workers'."""
    agent = hosted.agent
    with trio.fail_after(120):
        async with dspex_trio.open_pool(workers=2, launcher=hosted.launcher, diagnostics=True) as pool:
            pids = [w.pid for w in pool.statistics().workers]
            with agent._lock:  # as if each was spawned in its reservation (RayLauncher passes its id)
                agent._groups.update({pid: f"group-{pid}" for pid in pids})
        # the workers exited; the host's polls (the pump) forget them, the lifeline still holds
        await wait_until(lambda: not agent._workers, 30, lambda: f"known: {list(agent._workers)}")
        assert not agent._groups and agent.removed is None
        await hosted.stream.aclose()  # then the host is gone
        await wait_until(lambda: agent.exit_asked, 30, "the agent did not ask to end its actor")
    assert agent.removed == {f"group-{pid}" for pid in pids}, (agent.removed, pids)


async def test_an_agent_keeps_exited_workers_groups_for_a_while_and_at_most_so_many(hosted: Hosted) -> None:
    """``EXITED_GROUP_KEEP_S`` and ``MAX_EXITED_GROUPS`` bound what an agent keeps of exited workers."""
    agent = hosted.agent
    with agent._lock:
        agent._groups.update({1: "a", 2: "b", 3: "live"})
        agent._forget_group(1, 100.0)
        agent._forget_group(2, 100.0 + EXITED_GROUP_KEEP_S / 2)
        agent._forget_group(4, 101.0)  # a worker without a group
    assert agent._own_groups(100.0 + EXITED_GROUP_KEEP_S - 1) == {"a", "b", "live"}
    assert agent._own_groups(100.0 + EXITED_GROUP_KEEP_S) == {"b", "live"}  # a's time is up
    with agent._lock:
        for pid in range(10, 10 + MAX_EXITED_GROUPS + 5):
            agent._groups[pid] = f"g{pid}"
            agent._forget_group(pid, 200.0)
        assert len(agent._exited_groups) == MAX_EXITED_GROUPS  # the oldest went first: a and b
        assert "a" not in agent._exited_groups and "b" not in agent._exited_groups
        assert f"g{10 + MAX_EXITED_GROUPS + 4}" in agent._exited_groups
        agent._groups.clear()
        agent._exited_groups.clear()


async def test_a_stalled_host_is_not_taken_for_dead(hosted: Hosted) -> None:
    agent = hosted.agent
    with trio.fail_after(120):
        async with dspex_trio.open_pool(
            workers=1, launcher=hosted.launcher, diagnostics=True, heartbeat_interval=STALL_S
        ) as pool:
            pid = pool.statistics().workers[0].pid
            time.sleep(STALL_S)  # noqa: ASYNC251 - the host's event loop blocked (GC, a loaded machine): its lifeline holds
            await trio.sleep(0.5)  # and then some, with the loop running again
            assert agent.host_lost is None and not agent.exit_asked
            assert pid_alive(pid) and pid_alive(agent.ready()["template_pid"])
            assert await pool.call("echo", {"value": 2}) == 2


async def test_the_agents_end_closing_drops_the_agent_on_the_host() -> None:
    """The launcher's side: an agent whose lifeline ends is gone (its workers count as exited)."""
    ours, theirs = trio.socket.socketpair()
    handle = _Agent(actor=None, node_id="node-test", programs=())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(RayLauncher()._hold_lifeline, handle, trio.SocketStream(ours))
            await trio.lowlevel.checkpoint()
            assert handle.lost is None
            theirs.close()  # the agent's process died: its end closed
            await wait_until(lambda: handle.lost is not None, 30, "the launcher kept the agent")
    assert "lifeline reached EOF" in str(handle.lost), handle.lost


async def test_dropping_an_agent_closes_its_lifeline_which_ends_it(hosted: Hosted) -> None:
    """The launcher says it drops the agent before it closes the lifeline: the agent ends, leaving its
    workers' placement groups to the launcher (which may reuse them for replacements)."""
    launcher = RayLauncher()
    handle = hosted.handle
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(launcher._hold_lifeline, handle, hosted.stream)
            await trio.lowlevel.checkpoint()
            handle.gone("dropped by the test")
            await wait_until(lambda: hosted.agent.exit_asked, 30, "the agent outlived its lifeline")
    assert hosted.agent.dropped, hosted.agent.host_lost
    assert not pid_alive(hosted.agent.ready()["template_pid"])


async def test_a_lifeline_with_a_wrong_secret_is_refused() -> None:
    """The agent dials before it starts its template: refused, it fails to start."""
    async with open_worker_listener() as listener:
        token = f"agent-{secrets.token_hex(4)}"
        listener.expect(token)
        wrong = (listener.connect_to, token, secrets.token_hex(32), "node-test")
        with pytest.raises(RuntimeError, match="cannot reach its host"):
            await trio.to_thread.run_sync(RecordingAgent, {}, (), (), wrong)
        await wait_until(lambda: listener.refused == 1, 30, lambda: f"refused: {listener.refused}")
