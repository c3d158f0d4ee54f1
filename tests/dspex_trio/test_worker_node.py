"""The node of each worker (a Ray node id: ``RayLauncher``) where operators look: the per-worker
Prometheus series carry a ``node`` label (bounded in length; no /proc series for workers that may run on
another machine), and ``dspex-trio status`` prints it in the pool's snapshot and in state events.

In-process: fake workers (``tests/fakes.py``) whose processes say which node they run on, the
autojump clock."""

from __future__ import annotations

from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

import dspex_trio
from dspex_trio._cli_client import describe_event, describe_snapshot
from dspex_trio._launcher import WorkerSpec
from dspex_trio._metrics import MAX_NODE_LABEL_CHARS, RuntimeCollector, render_metrics
from tests.fakes import FakeLauncher, open_fake_launcher

LONG_NODE = "n" * (MAX_NODE_LABEL_CHARS + 40)


class OnNode:
    """A fake worker process that says which node it runs on (as a ``TcpWorker`` does)."""

    def __init__(self, process: Any, node: str) -> None:
        self._process = process
        self.node = node

    def __getattr__(self, name: str) -> Any:
        return getattr(self._process, name)


class NodesLauncher:
    """Each new worker on the next of ``nodes``."""

    def __init__(self, inner: FakeLauncher, nodes: list[str]) -> None:
        self.inner, self.nodes, self.name = inner, nodes, inner.name

    async def launch(self, spec: WorkerSpec) -> Any:
        return OnNode(await self.inner.launch(spec), self.nodes.pop(0))


def samples(collector: RuntimeCollector, family: str) -> list[dict[str, str]]:
    body, _ = render_metrics(collector)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return [dict(s.labels) for s in families[family].samples]


async def test_per_worker_series_carry_the_node_bounded(autojump_clock: Any) -> None:
    async with (
        open_fake_launcher(name="ray") as inner,
        dspex_trio.open_pool(workers=2, launcher=NodesLauncher(inner, ["node-a", LONG_NODE])) as pool,
    ):
        collector = RuntimeCollector(pool)
        in_flight = samples(collector, "dspex_worker_in_flight")
        assert sorted(s["node"] for s in in_flight) == ["n" * MAX_NODE_LABEL_CHARS, "node-a"], in_flight
        assert {s["worker_id"] for s in in_flight} == {w.worker_id for w in pool.statistics().workers}
        # a Ray worker's pid is its node's: this machine's /proc says nothing about it
        assert samples(collector, "dspex_worker_resident_memory_bytes") == []
        assert samples(collector, "dspex_worker_age_seconds") == []


async def test_a_local_workers_node_label_is_empty(autojump_clock: Any) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher) as pool,
    ):
        in_flight = samples(RuntimeCollector(pool), "dspex_worker_in_flight")
        assert [s.get("node", "") for s in in_flight] == [""], in_flight


async def test_status_prints_each_workers_node(autojump_clock: Any) -> None:
    async with (
        open_fake_launcher(name="ray") as inner,
        dspex_trio.open_pool(workers=2, launcher=NodesLauncher(inner, ["node-a", "node-b"])) as pool,
    ):
        text = describe_snapshot(pool.health().to_json())
    lines = text.splitlines()[1:]
    assert len(lines) == 2 and sorted(line.rsplit(" ", 1)[1] for line in lines) == ["node-a", "node-b"], text
    assert all(" on node " in line for line in lines), text
    event = {"worker_id": "w1", "pid": 42, "from": "ready", "to": "busy", "node": "node-a", "time": 0}
    assert "(pid 42 on node node-a): ready -> busy" in describe_event("worker_state", event)
    local = {**event, "node": ""}
    assert "(pid 42): ready -> busy" in describe_event("worker_state", local)


async def test_a_local_pools_status_names_no_node(autojump_clock: Any) -> None:
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
        await trio.lowlevel.checkpoint()
        assert "node" not in describe_snapshot(pool.health().to_json())
