"""A node's agent (``dspex_trio._ray_agent.NodeAgent``) without Ray: the agent runs in this process,
its methods called from threads as Ray's actor threads would (``LocalActor`` stands in for the actor
handle), and a pool uses the launcher's side of it (``_Agent``, ``RayControl``). Its template forks real
workers that dial the pool's listener over TCP. Checked: calls served by forked TCP workers; their
stderr reaches the host's ``dspex_trio.worker`` log, bounded (a flood is cut and the cut is said); a
worker's exit status is reported; a worker whose lifeline (the agent's pipe) hangs up exits, and the pool
replaces it; the template refuses malformed TCP spawns. The agent on a real Ray cluster (killed agent, host SIGKILL): ``test_ray.py``."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import dspex_trio
from bridge_child._zygote import MAX_MESSAGE_BYTES, MAX_TCP_FIELD_CHARS
from bridge_child.tcp import MAX_ACCELERATOR_ENV_CHARS
from dspex_trio._launcher import WorkerSpec, worker_environment
from dspex_trio._ray_agent import STDERR_BYTES_PER_S, NodeAgent
from dspex_trio._ray_launcher import RayControl, _Agent, _kill, await_ref
from dspex_trio._tcp_worker import TcpWorker, WorkerListener, open_worker_listener
from tests.helpers import pid_alive, wait_until

pytestmark = pytest.mark.real_processes


class _Method:
    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, method: Any) -> None:
        self.pool, self.method = pool, method

    def remote(self, *args: Any) -> Any:
        future = self.pool.submit(self.method, *args)
        return type("Ref", (), {"future": lambda _self: future})()


class LocalActor:
    """What a Ray actor handle does for the agent: ``actor.method.remote(*args)`` runs it in a thread."""

    def __init__(self, agent: NodeAgent, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._agent, self._pool = agent, pool

    def __getattr__(self, name: str) -> _Method:
        return _Method(self._pool, getattr(self._agent, name))


class AgentLauncher:
    """``RayLauncher.launch`` without the placement: every worker from one agent."""

    name = "agent"

    def __init__(self, handle: _Agent, listener: WorkerListener) -> None:
        self.handle, self.listener = handle, listener
        self.env: list[dict[str, str]] = []
        """The accelerator variables of the next workers, one each (as a launcher's placements give)."""

    async def launch(self, spec: WorkerSpec) -> TcpWorker:
        token = f"{spec.worker_id}-{secrets.token_hex(4)}"
        receive = self.listener.expect(token)
        spawn = self.handle.actor.spawn.remote(
            self.listener.connect_to,
            token,
            self.listener.secret.hex(),
            "node-test",
            spec.argv(),
            self.env.pop(0) if self.env else None,
        )
        pid = await await_ref(spawn)
        control = RayControl(self.handle, pid)
        self.handle.register(control)
        stream, claims = await self.listener.accept_worker(token, receive, timeout=30, exited=control.exited)
        return TcpWorker(stream, control, node=str(claims["node"]))


@pytest.fixture
async def agent() -> AsyncIterator[tuple[NodeAgent, AgentLauncher]]:
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        node_agent = await trio.to_thread.run_sync(NodeAgent, {}, (), ())
        handle = _Agent(LocalActor(node_agent, threads), "node-test", ())
        try:
            async with open_worker_listener() as listener, trio.open_nursery() as nursery:
                nursery.start_soon(handle.pump)
                yield node_agent, AgentLauncher(handle, listener)
                nursery.cancel_scope.cancel()
        finally:
            node_agent.close()  # the template exits on EOF, as when the agent dies
            code = await trio.to_thread.run_sync(_wait, node_agent._template, 30)
            assert code == 0, f"the template did not exit on EOF: {code}"


async def test_forked_tcp_workers_serve_and_their_stderr_reaches_the_host_log(
    agent: tuple[NodeAgent, AgentLauncher], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspex_trio.worker")
    node_agent, launcher = agent
    assert node_agent.ready()["template_pid"] > 0
    with trio.fail_after(120):
        async with dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool:
            stats = pool.statistics().workers
            assert {w.node for w in stats} == {"node-test"}, stats
            assert all(_parent(w.pid) == node_agent._template.pid for w in stats)  # forked by the template
            # the agent reads each worker's resident memory and age (its node's /proc) in its poll
            controls = launcher.handle.controls

            def usages() -> list[Any]:
                return [c.usage() for c in controls.values()]

            await wait_until(lambda: len(usages()) == 2 and None not in usages(), 30, lambda: f"{usages()}")
            for usage in usages():
                assert usage.rss_bytes > 1_000_000 and 0 <= usage.age_s < 600, usages()
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(pool.call, "echo", {"value": i})
            assert await pool.call("spew_stderr", {"bytes": 1000}) == 1000

            def relayed() -> list[str]:
                return [
                    r.getMessage()
                    for r in caplog.records
                    if r.name == "dspex_trio.worker" and "eeee" in r.getMessage()
                ]

            await wait_until(lambda: len(relayed()) >= 10, 30, lambda: f"relayed: {relayed()[:3]}")
            assert all(m.startswith("[w") for m in relayed()), relayed()[:3]
            # a flood: at most STDERR_BYTES_PER_S per second reach the host, and the cut is said
            flood = 32 * STDERR_BYTES_PER_S  # written in far less than the 32 s it would take to pass
            assert await pool.call("spew_stderr", {"bytes": flood}) == flood

            def dropped() -> list[str]:
                return [r.getMessage() for r in caplog.records if "bytes of stderr dropped" in r.getMessage()]

            await wait_until(dropped, 30, "no drop was reported")
            assert len(relayed()) * 100 < flood // 2, len(relayed())  # most of it never crossed


async def test_an_exit_status_is_reported_and_a_lost_lifeline_ends_the_worker(
    agent: tuple[NodeAgent, AgentLauncher],
) -> None:
    node_agent, launcher = agent
    with trio.fail_after(120):
        async with dspex_trio.open_pool(workers=1, diagnostics=True, launcher=launcher) as pool:
            first = pool.statistics().workers[0].pid
            with pytest.raises(dspex_trio.WorkerCrashed, match="code 3"):
                await pool.call("crash", {"exit_code": 3})
            await wait_until(
                lambda: (
                    [w.pid for w in pool.statistics().workers if w.state.name == "READY"] not in ([], [first])
                ),
                60,
                lambda: f"not replaced: {pool.statistics().workers}",
            )
            second = pool.statistics().workers[0].pid
            # the agent's end of its lifeline closes (as when the agent dies): the worker exits by itself
            with node_agent._lock:
                worker = node_agent._workers[second]
                lifeline, worker.lifeline = worker.lifeline, -1
            os.close(lifeline)
            await wait_until(lambda: not pid_alive(second), 30, f"worker {second} outlived its lifeline")
            await wait_until(
                lambda: (
                    [w.pid for w in pool.statistics().workers if w.state.name == "READY"]
                    not in ([], [second])
                ),
                60,
                lambda: f"not replaced: {pool.statistics().workers}",
            )
            assert await pool.call("echo", {"value": 5}) == 5


async def test_a_forked_worker_gets_the_accelerators_of_its_reservation(
    agent: tuple[NodeAgent, AgentLauncher],
) -> None:
    """The variables the launcher's probe found for a worker's bundle ride with its spawn and are in the
    forked worker's environment; a worker spawned without them has none (the template's environment
    has none: not on the allow-list)."""
    _, launcher = agent
    launcher.env = [
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0", "NEURON_RT_VISIBLE_CORES": "3"},
    ]
    with trio.fail_after(120):
        async with dspex_trio.open_pool(workers=3, launcher=launcher) as pool:
            seen = sorted(
                [(await worker.call("stats", timeout=30))["accelerators"] for worker in pool.workers()],
                key=lambda env: sorted(env.items()),
            )
    assert seen == [
        {},
        {"CUDA_VISIBLE_DEVICES": "0", "NEURON_RT_VISIBLE_CORES": "3"},
        {"CUDA_VISIBLE_DEVICES": "1"},
    ], seen


def _wait(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return None


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError):
        return None


def test_the_template_refuses_malformed_tcp_spawns() -> None:
    """A TCP spawn needs exactly two fds and string ``connect``, ``token``, ``node`` within bounds; anything
    else is answered with an error, and nothing is forked."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    template = subprocess.Popen(
        [sys.executable, "-m", "bridge_child._zygote", "--control-fd", str(child.fileno())],
        pass_fds=(child.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=worker_environment(os.environ),
    )
    child.close()
    r, w = os.pipe()
    try:
        parent.settimeout(120)
        assert json.loads(parent.recv(MAX_MESSAGE_BYTES))["op"] == "ready"
        good = {"connect": "127.0.0.1:1", "token": "t", "node": "n"}
        requests = [
            (good, [r]),  # too few fds
            (good, [r, w, r]),  # too many
            ({**good, "connect": 1}, [r, w]),  # not a string
            ({**good, "token": "x" * (MAX_TCP_FIELD_CHARS + 1)}, [r, w]),  # too long
            ({"connect": "127.0.0.1:1", "token": "t"}, [r, w]),  # no node
            ({**good, "env": {"LD_PRELOAD": "x.so"}}, [r, w]),  # not an accelerator variable
            ({**good, "env": {"CUDA_VISIBLE_DEVICES": 1}}, [r, w]),  # not a string
            ({**good, "env": {"CUDA_VISIBLE_DEVICES": "0" * (MAX_ACCELERATOR_ENV_CHARS + 1)}}, [r, w]),
            ({**good, "env": ["CUDA_VISIBLE_DEVICES"]}, [r, w]),  # not an object
        ]
        for i, (tcp, fds) in enumerate(requests, 1):
            message = {"op": "spawn", "id": i, "argv": [], "tcp": tcp}
            socket.send_fds(parent, [json.dumps(message).encode()], fds)
            reply = json.loads(parent.recv(MAX_MESSAGE_BYTES))
            assert reply["op"] == "error" and reply["id"] == i, (tcp, len(fds), reply)
    finally:
        os.close(r)
        os.close(w)
        parent.close()  # EOF: the template exits
        assert _wait(template, 30) == 0


def test_ending_an_agent_outside_ray_never_starts_ray() -> None:
    """The launcher kills an agent's actor when the agent is gone; with a fake actor (these tests) in a
    process that imported ``ray`` but is not connected, ``ray.kill`` would auto-start a local Ray (its
    processes children of this one, on the machine's addresses): it must not be called."""
    ray = pytest.importorskip("ray")
    try:
        _kill(object())
        assert not ray.is_initialized()
    finally:
        if ray.is_initialized():
            ray.shutdown()
