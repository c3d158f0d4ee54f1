"""RayLauncher on a real Ray cluster of 3 nodes on this machine (``ray.cluster_utils.Cluster``).

Ray binds the machine's external address unless it has none, and tests here may only talk to loopback:
so the cluster tests run in a network namespace of their own with only loopback up. The one test run
normally, ``test_the_ray_tests_in_a_loopback_only_network_namespace``, re-runs this file under
``unshare -n sh -c 'ip link set lo up && ...'`` (root needed) with ``DSPEX_RAY_NETNS=1``, where the
cluster tests run (and that test skips). Without Ray they skip, saying how to get it.

Run them alone: ``.venv/bin/pytest tests/dspex_trio/test_ray.py -q`` (see docs/scale-out.md).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio._metrics import RuntimeCollector
from dspex_trio._states import WorkerState
from tests.helpers import pid_alive, read_until, wait_until

ROOT = Path(__file__).resolve().parents[2]
HAVE_RAY = importlib.util.find_spec("ray") is not None
IN_NETNS = os.environ.get("DSPEX_RAY_NETNS") == "1"
NEEDS_RAY = "Ray is not installed: pip install -e '.[ray]' (the extra dspex-trio[ray])"
NETNS_RUN_TIMEOUT_S = 420
"""The whole file inside the namespace: a 3-node cluster starts in ~15 s here, the tests take ~1 min."""
NODES = 3
NODE_CPUS = 2
GPU_NODE_GPUS = 2
"""Fake GPUs of one worker node (Ray assigns ids for them whether or not they exist)."""
GPU_NODE_LABEL = {"dspex-test-pool": "gpu"}
"""That node's label (the others have none)."""
GPU_NODE_RESOURCE = "dspex_test_gpu_node"
"""A custom resource only that node has (2 of it)."""
RAY_CLIENT_PORT = 10001
"""The head's Ray Client server (``ray://127.0.0.1:10001``; Ray's default port, free in the namespace)."""
CLUSTER_TESTS = 11
SERVE = [sys.executable, "-m", "dspex_trio", "serve", "--port", "0", "--workers", "2"]
"""The tests below, which must all pass inside the namespace."""


def test_the_ray_tests_in_a_loopback_only_network_namespace() -> None:
    if IN_NETNS:
        pytest.skip("inside the namespace already: the tests below run")
    if not HAVE_RAY:
        pytest.skip(NEEDS_RAY)
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip to make a loopback-only network namespace")
    env = {**os.environ, "DSPEX_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    command = 'ip link set lo up && exec "$0" -m pytest "$1" -q -p no:cacheprovider -x'
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", command, sys.executable, str(Path(__file__).relative_to(ROOT))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=NETNS_RUN_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:  # the inner run's report, whole, in this test's captured output
        print(result.stdout[-30000:], result.stderr[-6000:], sep="\n")
    assert result.returncode == 0, "the Ray tests failed in the namespace: their report is printed above"
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == CLUSTER_TESTS, result.stdout[-3000:]
    assert "1 skipped" in summary, summary  # this test, inside: every cluster test ran
    print(result.stdout[-3000:])


inside = pytest.mark.skipif(not (IN_NETNS and HAVE_RAY), reason="runs in a loopback-only namespace (above)")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": NODE_CPUS,
            "include_dashboard": False,
            "ray_client_server_port": RAY_CLIENT_PORT,
        },
    )
    c.add_node(
        num_cpus=NODE_CPUS, num_gpus=GPU_NODE_GPUS, labels=GPU_NODE_LABEL, resources={GPU_NODE_RESOURCE: 2}
    )
    for _ in range(NODES - 2):
        c.add_node(num_cpus=NODE_CPUS)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, include_dashboard=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def workers(pool: dspex_trio.Pool) -> list[Any]:
    return list(pool.statistics().workers)


def unreserved() -> str | None:
    """None once the cluster's CPUs and GPUs are all free again (Ray removes placement groups
    asynchronously: a test that filled a node waits for it, so the next one can spread), else what
    is still held."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    held = {r: (free.get(r, 0), total[r]) for r in ("CPU", "GPU") if free.get(r, 0) < total.get(r, 0)}
    return f"held (free, total): {held}" if held else None


def gpu_node() -> str:
    import ray

    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    return str(node)


@inside
async def test_calls_and_dspy_executions_spread_over_all_nodes(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dspex_trio.worker")
    with trio.fail_after(120):
        async with (
            dspex_trio.RayLauncher(address=cluster.address, num_cpus=1) as launcher,
            dspex_trio.open_pool(workers=NODES, diagnostics=True, launcher=launcher) as pool,
        ):
            stats = workers(pool)
            assert {w.node for w in stats} == alive_nodes(), stats  # spread: one on each node
            assert all(w.launcher == "ray" for w in stats)
            pids = {w.pid for w in stats}
            assert all(pid_alive(pid) for pid in pids)
            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(pool.call, "echo", {"value": i})
            served = [w.calls_served for w in workers(pool)]
            assert sum(served) >= 60 and all(n > 0 for n in served), served
            # each worker's resident memory and age, read by its agent on its node, in the metrics
            collector = RuntimeCollector(pool)

            def figures() -> dict[str, dict[str, float]]:
                return {
                    name: metric_samples(collector, name) for name in ("resident_memory_bytes", "age_seconds")
                }

            await wait_until(
                lambda: all(set(f) == {w.worker_id for w in stats} for f in figures().values()),
                30,
                lambda: f"{figures()}",
            )
            assert all(v > 1_000_000 for v in figures()["resident_memory_bytes"].values()), figures()
            # one agent per node, whose template forked that node's worker
            agents = launcher.agents
            assert set(agents) == alive_nodes(), agents
            assert {_ppid(w.pid) for w in stats} == {a["template_pid"] for a in agents.values()}, agents
            # a worker's stderr reaches this host's log, under the worker's id
            assert await pool.call("spew_stderr", {"bytes": 500}) == 500

            def relayed() -> list[str]:
                return [r.getMessage() for r in caplog.records if r.name == "dspex_trio.worker"]

            await wait_until(
                lambda: sum("eeee" in m for m in relayed()) >= 5, 30, lambda: f"{relayed()[-5:]}"
            )
            # resized down and up again (the new workers go to the nodes with the fewest workers)
            await pool.resize(1)
            await wait_until(lambda: len(workers(pool)) == 1, 30)
            await wait_until(lambda: sum(pid_alive(pid) for pid in pids) == 1, 10)
            await pool.resize(NODES)
            again = workers(pool)
            assert len(again) == NODES and all(w.state is WorkerState.READY for w in again), again
            assert len({w.node for w in again}) >= 2 and {w.node for w in again} <= alive_nodes(), again
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(pool.call, "echo", {"value": i})
            pids |= {w.pid for w in again}
        await wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10)


@inside
async def test_the_pool_exit_leaves_no_worker_and_the_launchers_no_actor_nor_process(cluster: Any) -> None:
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()

    def alive_actors() -> list[Any]:
        actors = ray._private.state.actors(job_id=ray.JobID.from_hex(job)).values()
        return [a for a in actors if a["State"] != "DEAD"]

    def reserved() -> list[Any]:  # placement groups of this job not removed
        return [g for g in placement_group_table().values() if g["state"] != "REMOVED"]

    with trio.fail_after(120):
        async with dspex_trio.RayLauncher(address=cluster.address) as launcher:
            async with dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool:
                assert await pool.call("echo", {"value": 1}) == 1
                pids = {w.pid for w in workers(pool)}
                agents = launcher.agents
                assert set(agents) == {w.node for w in workers(pool)}, agents  # one per node hosting workers
                templates = {a["template_pid"] for a in agents.values()}
                agent_pids = {a["pid"] for a in agents.values()}
                assert {_ppid(pid) for pid in pids} == templates
                assert all(pid_alive(pid) for pid in templates | agent_pids)
            # every worker is gone; the agents stay up for the launcher's next workers
            await wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10)
            assert all(pid_alive(pid) for pid in templates | agent_pids)
        # leaving the launcher: every agent and template gone, and the cluster's own view (the GCS):
        # no actor of this job alive, no reservation left
        await wait_until(lambda: not any(pid_alive(pid) for pid in templates | agent_pids), 10)
        await wait_until(lambda: not alive_actors(), 10, lambda: f"alive: {alive_actors()}")
        await wait_until(lambda: not reserved(), 10, lambda: f"reserved: {reserved()}")
        assert ray.is_initialized()


@inside
async def test_a_killed_agent_loses_its_workers_which_are_replaced(cluster: Any) -> None:
    with trio.fail_after(120):
        async with (
            dspex_trio.RayLauncher(address=cluster.address, num_cpus=1) as launcher,
            dspex_trio.open_pool(workers=NODES, diagnostics=True, launcher=launcher) as pool,
        ):
            before = workers(pool)
            victim_node = before[0].node
            agent = launcher.agents[victim_node]
            lost = {w.pid for w in before if w.node == victim_node}
            os.kill(agent["pid"], signal.SIGKILL)
            await wait_until(
                lambda: not any(pid_alive(pid) for pid in (*lost, agent["template_pid"])),
                30,
                "a worker or the template outlived its agent",
            )

            def replaced() -> bool:
                now = workers(pool)
                ready = [w for w in now if w.state in (WorkerState.READY, WorkerState.BUSY)]
                return len(ready) == NODES and not {w.pid for w in now} & lost

            await wait_until(replaced, 60, lambda: f"not replaced: {workers(pool)}")
            assert pool.statistics().restarts >= len(lost)
            new_agent = launcher.agents.get(victim_node)  # replacements on that node have a new agent
            assert new_agent is None or new_agent["pid"] != agent["pid"], new_agent
            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(pool.call, "echo", {"value": i})


@inside
async def test_a_host_sigkilled_leaves_nothing_after_5_s(cluster: Any, tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, os, sys, trio, dspex_trio, ray

            async def main():
                async with dspex_trio.RayLauncher(address={cluster.address!r}) as launcher:
                    async with dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool:
                        await pool.call("echo", {{"value": 1}})
                        pids = [w.pid for w in pool.statistics().workers]
                        agents = [a["pid"] for a in launcher.agents.values()]
                        print(json.dumps([pids, agents]), flush=True)
                        await trio.sleep_forever()

            trio.run(main)
            """
        )
    )
    host = await trio.lowlevel.open_process(
        [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert host.stdout is not None
        with trio.fail_after(120):
            line = await read_until(
                host.stdout, lambda data: data.endswith(b"\n"), "the host exited before starting its pool"
            )
        pids, agents = json.loads(line)
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
        templates = {p for pid in pids if (p := _ppid(pid)) is not None}
        actor_pids = templates | set(agents)
        assert len(agents) == 2 and all(pid_alive(pid) for pid in actor_pids)
        host.send_signal(signal.SIGKILL)
        await host.wait()
        killed_at = time.monotonic()
        await wait_until(lambda: not any(pid_alive(pid) for pid in (*pids, *actor_pids)), 5)
        print(f"all gone {time.monotonic() - killed_at:.2f} s after the host's SIGKILL")
    finally:
        if host.returncode is None:
            host.kill()
            await host.wait()


def metric_samples(collector: Any, name: str) -> dict[str, float]:
    """The ``dspex_worker_<name>`` samples by worker id."""
    from prometheus_client.parser import text_string_to_metric_families

    from dspex_trio._metrics import render_metrics

    body, _ = render_metrics(collector)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return {s.labels["worker_id"]: s.value for s in families[f"dspex_worker_{name}"].samples}


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[1])
    except (OSError, ValueError):
        return None


def _status_over_websocket(url: str) -> dict[str, Any]:
    from websockets.sync.client import connect

    with connect(url, subprotocols=["dspex.v1"], open_timeout=10) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "runtime/status"}))
        result: dict[str, Any] = json.loads(ws.recv(timeout=10))["result"]
        return result


def held_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0))


@inside
async def test_serve_ray_runs_the_served_pool_on_the_cluster(cluster: Any) -> None:
    """``serve --ray`` with a worker's resources from its flags: half a CPU and one of a custom resource
    only one node has, so both workers go to that node, holding one CPU in all."""
    await wait_until(lambda: unreserved() is None, 30, lambda: str(unreserved()))
    placement = ["--ray-num-cpus", "0.5", "--ray-resource", f"{GPU_NODE_RESOURCE}=1"]
    process = await trio.lowlevel.open_process(
        [*SERVE, "--ray", cluster.address, "--ray-listen", "127.0.0.1:0", *placement],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(120):
            output = await read_until(
                process.stdout,
                lambda data: b"\n" in data,
                lambda: f"serve exited early: {process.returncode}",
            )
        url = output.decode().splitlines()[0].split()[2]
        status = await trio.to_thread.run_sync(_status_over_websocket, url)
        assert status["health"]["launcher"] == "ray", status
        pids = [w["pid"] for w in status["health"]["workers"]]
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
        nodes = [w.get("node") for w in status["health"]["workers"]]
        assert nodes == [gpu_node()] * 2, status["health"]["workers"]
        await wait_until(lambda: held_cpus() == 1.0, 30, lambda: f"CPUs held: {held_cpus()}")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
        await wait_until(lambda: not any(pid_alive(pid) for pid in pids), 5, "a worker outlived serve")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@inside
async def test_a_worker_no_node_can_host_fails_to_start_within_its_bound(cluster: Any) -> None:
    import ray

    with trio.fail_after(60):
        async with dspex_trio.RayLauncher(
            address=cluster.address, resources={"no_such_resource": 1}, start_timeout=2
        ) as launcher:
            async with dspex_trio.open_pool(workers=1, launcher=launcher, restart_intensity=0) as pool:
                assert pool.statistics().circuit is dspex_trio.CircuitState.OPEN
                assert "could not start on Ray" in pool.statistics().circuit_reason
                with pytest.raises(dspex_trio.PoolUnavailable):
                    await pool.call("echo", {"value": 1})
            job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())

            def pending() -> list[Any]:
                return [a for a in ray._private.state.actors(job_id=job).values() if a["State"] != "DEAD"]

            await wait_until(lambda: not pending(), 10, lambda: f"left: {pending()}")


@inside
async def test_gpu_workers_see_only_the_gpus_of_their_reservation(cluster: Any) -> None:
    """Two workers of one GPU each on a node of two: each sees its own GPU id (CUDA_VISIBLE_DEVICES,
    what Ray assigned to its placement group), disjoint, although one template forked both."""
    from ray.util.placement_group import placement_group_table

    async def visible() -> list[str]:
        seen = [(await worker.call("stats", timeout=30))["accelerators"] for worker in pool.workers()]
        return sorted(env.get("CUDA_VISIBLE_DEVICES", "") for env in seen)

    with trio.fail_after(120):
        async with (
            dspex_trio.RayLauncher(address=cluster.address, num_gpus=1) as launcher,
            dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool,
        ):
            assert {w.node for w in workers(pool)} == {gpu_node()}, workers(pool)
            assert await visible() == ["0", "1"]
            # a crashed worker's replacement goes to the GPU node (the only one that could host it),
            # in its predecessor's reservation (no new placement group): the same GPU, free again
            groups = len(placement_group_table())
            first = pool.workers()[0]
            victim = first.pid
            with pytest.raises(dspex_trio.WorkerCrashed):
                await first.call("crash", {"exit_code": 3})

            def replaced() -> bool:
                now = workers(pool)
                return (
                    len(now) == 2
                    and victim not in {w.pid for w in now}
                    and all(w.state is WorkerState.READY for w in now)
                )

            await wait_until(replaced, 60, lambda: f"not replaced: {workers(pool)}")
            assert {w.node for w in workers(pool)} == {gpu_node()}, workers(pool)
            assert await visible() == ["0", "1"]
            assert len(placement_group_table()) == groups, placement_group_table()
        await wait_until(lambda: unreserved() is None, 30, lambda: str(unreserved()))


@inside
async def test_a_label_selector_places_workers_on_the_labelled_node_only(cluster: Any) -> None:
    """``label_selector`` (sent as the bundle's ``bundle_label_selector``): both workers go to the one
    labelled node, although spreading would put them on two nodes."""
    with trio.fail_after(120):
        async with (
            dspex_trio.RayLauncher(address=cluster.address, label_selector=GPU_NODE_LABEL) as launcher,
            dspex_trio.open_pool(workers=2, launcher=launcher) as pool,
        ):
            assert [w.node for w in workers(pool)] == [gpu_node()] * 2, workers(pool)
            assert await pool.call("ping") is not None
        await wait_until(lambda: unreserved() is None, 30, lambda: str(unreserved()))


@inside
async def test_a_ray_client_address_runs_the_pool_and_its_exit_leaves_no_actor(
    cluster: Any, tmp_path: Path
) -> None:
    """``RayLauncher(address="ray://...")``: the host is a Ray Client (another process: this one is a
    driver already), whose actors and placement groups the head's client server makes for it; its
    workers dial back to the host's listener as usual. Calls spread over two nodes; leaving the pool
    and the launcher leaves no actor of the client's job, no reservation and no process."""
    import ray
    from ray.util.placement_group import placement_group_table

    # room on every node, so the two workers spread (a test before may have filled one, freed asynchronously)
    await wait_until(lambda: unreserved() is None, 30, lambda: str(unreserved()))
    script = tmp_path / "client_host.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys, trio, dspex_trio, ray, ray.util.client

            def say(what):
                print(json.dumps(what), flush=True)

            async def main():
                launcher = dspex_trio.RayLauncher(address="ray://127.0.0.1:{RAY_CLIENT_PORT}", num_cpus=1)
                async with launcher:
                    job = ray.get_runtime_context().get_job_id()
                    async with dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool:
                        async with trio.open_nursery() as nursery:
                            for i in range(40):
                                nursery.start_soon(pool.call, "echo", {{"value": i}})
                        stats = pool.statistics().workers
                        agents = launcher.agents
                        say({{
                            "client": ray.util.client.ray.is_connected(),
                            "job": job,
                            "pids": [w.pid for w in stats],
                            "nodes": [w.node for w in stats],
                            "served": [w.calls_served for w in stats],
                            "agents": [[a["pid"], a["template_pid"]] for a in agents.values()],
                            "echo": await pool.call("echo", {{"value": "via ray://"}}),
                        }})
                say("exited")

            trio.run(main)
            """
        )
    )
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, str(script)], cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0 and lines[-1:] == ['"exited"'], (lines, result.stderr.decode()[-4000:])
    seen = json.loads(lines[-2])
    assert seen["client"] is True and seen["echo"] == "via ray://", seen
    assert len(set(seen["nodes"])) == 2 and set(seen["nodes"]) <= alive_nodes(), seen  # spread
    assert sum(seen["served"]) >= 40 and all(n > 0 for n in seen["served"]), seen
    processes = {*seen["pids"], *(pid for pair in seen["agents"] for pid in pair)}
    assert len(processes) == 6, seen  # 2 workers, 2 agents, 2 templates
    job = ray.JobID.from_hex(seen["job"])

    def alive_actors() -> list[Any]:
        return [a for a in ray._private.state.actors(job_id=job).values() if a["State"] != "DEAD"]

    def reserved() -> list[Any]:  # placement groups not removed (the tests before removed theirs)
        return [g for g in placement_group_table().values() if g["state"] != "REMOVED"]

    await wait_until(lambda: not any(pid_alive(pid) for pid in processes), 30, lambda: f"{seen}")
    await wait_until(lambda: not alive_actors(), 30, lambda: f"alive: {alive_actors()}")
    await wait_until(lambda: not reserved(), 30, lambda: f"reserved: {reserved()}")


@inside
async def test_a_ray_client_host_sigkilled_leaves_no_actor_nor_process_after_5_s(
    cluster: Any, tmp_path: Path
) -> None:
    """A host connected through Ray Client (whose server keeps a lost client's session, and so its
    actors, for the reconnect grace period: 30 s) is SIGKILLed with workers ready on two nodes: each
    agent's lifeline (its TCP connection to the host) reaches EOF, and it kills its template and
    workers, removes their placement groups and ends its actor. Within 5 s: no actor of the host's job
    alive (Ray's view), no agent, template or worker process left; the reservations are free soon after
    (well before the grace period ends)."""
    import ray

    await wait_until(lambda: unreserved() is None, 30, lambda: str(unreserved()))
    script = tmp_path / "client_host_killed.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, trio, dspex_trio, ray

            async def main():
                launcher = dspex_trio.RayLauncher(address="ray://127.0.0.1:{RAY_CLIENT_PORT}", num_cpus=1)
                async with launcher:
                    job = ray.get_runtime_context().get_job_id()
                    async with dspex_trio.open_pool(workers=2, diagnostics=True, launcher=launcher) as pool:
                        await pool.call("echo", {{"value": 1}})
                        stats = pool.statistics().workers
                        print(json.dumps({{
                            "job": job,
                            "pids": [w.pid for w in stats],
                            "nodes": [w.node for w in stats],
                            "agents": [[a["pid"], a["template_pid"]] for a in launcher.agents.values()],
                        }}), flush=True)
                        await trio.sleep_forever()

            trio.run(main)
            """
        )
    )
    grace = {"RAY_CLIENT_RECONNECT_GRACE_PERIOD": "30"}  # Ray's default, whatever the environment says
    host = await trio.lowlevel.open_process(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, **grace},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert host.stdout is not None
        with trio.fail_after(120):
            line = await read_until(
                host.stdout, lambda data: data.endswith(b"\n"), "the host exited before its pool was ready"
            )
        seen = json.loads(line)
        assert len(set(seen["nodes"])) == 2, seen  # workers ready on two nodes, each with its agent
        processes = {*seen["pids"], *(pid for pair in seen["agents"] for pid in pair)}
        assert len(processes) == 6 and all(pid_alive(pid) for pid in processes), seen
        job = ray.JobID.from_hex(seen["job"])

        def alive_actors() -> list[Any]:
            return [a for a in ray._private.state.actors(job_id=job).values() if a["State"] != "DEAD"]

        assert len(alive_actors()) == 2, alive_actors()
        host.send_signal(signal.SIGKILL)
        await host.wait()
        killed_at = time.monotonic()
        await wait_until(
            lambda: not any(pid_alive(pid) for pid in processes),
            5,
            lambda: f"alive: {[pid for pid in processes if pid_alive(pid)]} of {seen}",
        )
        processes_gone = time.monotonic() - killed_at
        await wait_until(lambda: not alive_actors(), 5, lambda: f"alive: {alive_actors()}")
        print(
            f"through Ray Client: processes gone {processes_gone:.2f} s, actors dead "
            f"{time.monotonic() - killed_at:.2f} s after the host's SIGKILL"
        )
        # its workers' reservations: removed by the agents too (Ray Client would keep them for its grace
        # period, 30 s)
        await wait_until(lambda: unreserved() is None, 10, lambda: str(unreserved()))
        print(f"reservations released {time.monotonic() - killed_at:.2f} s after the host's SIGKILL")
    finally:
        if host.returncode is None:
            host.kill()
            await host.wait()


@inside
async def test_a_node_removed_under_load(cluster: Any) -> None:
    """Last: it removes a node. No call hangs, none is misdelivered, idempotent calls all succeed, the
    lost workers are replaced on the surviving nodes and nothing of them is left."""
    results: Counter[str] = Counter()
    wrong: list[Any] = []

    async def caller(i: int, stop: trio.Event) -> None:
        n = 0
        while not stop.is_set():
            value = f"{i}-{n}"
            got = await pool.call("sleep", {"seconds": 0.02}, idempotent=True)
            if got != 0.02:
                wrong.append(got)
            echoed = await pool.call("echo", {"value": value}, idempotent=True)
            if echoed != value:
                wrong.append((value, echoed))
            try:  # not idempotent: its own result, or a typed failure if its worker was lost
                once = await pool.call("sleep", {"seconds": 0.02})
            except dspex_trio.WorkerCrashed:
                results["crashed"] += 1
            else:
                if once != 0.02:
                    wrong.append(once)
            results["ok"] += 1
            n += 1

    # every node must have room for its worker (a test before may have filled one, freed asynchronously)
    await wait_until(lambda: unreserved() is None, 30, lambda: str(unreserved()))
    with trio.fail_after(180):
        async with (
            dspex_trio.RayLauncher(address=cluster.address, num_cpus=1) as launcher,
            dspex_trio.open_pool(workers=NODES, diagnostics=True, launcher=launcher) as pool,
        ):
            before = workers(pool)
            head_id = cluster.head_node.node_id
            victim_node = next(n for n in cluster.worker_nodes)
            victim_id = victim_node.node_id
            lost = {w.pid for w in before if w.node == victim_id}
            assert lost, before
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(caller, i, stop)
                await wait_until(lambda: results["ok"] >= 20, 30)
                await trio.to_thread.run_sync(cluster.remove_node, victim_node)
                await wait_until(lambda: not any(pid_alive(pid) for pid in lost), 30)

                def replaced() -> bool:
                    now = workers(pool)
                    return len(
                        [w for w in now if w.state in (WorkerState.READY, WorkerState.BUSY)]
                    ) == NODES and (not {w.pid for w in now} & lost)

                await wait_until(replaced, 60, lambda: f"not replaced: {workers(pool)}")
                mark = results["ok"]
                await wait_until(lambda: results["ok"] >= mark + 20, 30)  # load on the replacements
                stop.set()
            after = workers(pool)
            assert not wrong, wrong
            assert {w.node for w in after} <= alive_nodes() and victim_id not in {w.node for w in after}
            assert head_id in {w.node for w in after}
            assert pool.statistics().restarts >= len(lost)
