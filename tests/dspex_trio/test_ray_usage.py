"""A Ray worker's resident memory and age: read by its node's agent (``/proc`` there) in its long poll,
kept by the worker's ``RayControl``, and shown in the per-worker metrics (``worker_resident_memory_bytes``,
``worker_age_seconds``) as a local worker's are. In-process: the control and the collector on the
autojump clock, with fake workers whose processes report figures as a ``TcpWorker`` of a Ray worker does.
The agent reading real processes: ``test_ray_agent.py``; on a real cluster: ``test_ray.py``."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import dspex_trio
from dspex_trio._launcher import WorkerSpec
from dspex_trio._metrics import RuntimeCollector, render_metrics
from dspex_trio._ray_launcher import RayControl, _Agent
from dspex_trio._tcp_worker import ProcessUsage
from tests.fakes import FakeLauncher, open_fake_launcher


class Actor:
    """An agent actor nobody calls (the news is fed by hand)."""


def control(pid: int = 4242) -> tuple[_Agent, RayControl]:
    agent = _Agent(Actor(), "node-a", ())
    worker = RayControl(agent, pid)
    agent.register(worker)
    return agent, worker


async def test_the_figures_its_agent_reported_the_age_brought_up_to_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent, worker = control()
    assert worker.usage() is None  # nothing reported yet
    worker.set_usage(123_456, 2.5)
    await trio.sleep(4)
    assert worker.usage() == ProcessUsage(rss_bytes=123_456, age_s=pytest.approx(6.5))
    worker.set_usage(None, None)  # its /proc entry was unreadable
    assert worker.usage() == ProcessUsage(rss_bytes=None, age_s=None)
    agent._news(4242, "exit", 0)
    assert worker.usage() is None  # exited: no figures of a process that is gone


class Reporting:
    """A fake worker process of a Ray node: its agent reported these figures."""

    def __init__(self, process: Any, usage: ProcessUsage | None) -> None:
        self._process, self._usage, self.node = process, usage, "node-a"

    def usage(self) -> ProcessUsage | None:
        return self._usage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._process, name)


class ReportingLauncher:
    """Each new worker's process reports the next of ``usages``; ``given`` says which got which."""

    def __init__(self, inner: FakeLauncher, usages: list[ProcessUsage | None]) -> None:
        self.inner, self.usages, self.name = inner, usages, inner.name
        self.given: dict[str, ProcessUsage | None] = {}

    async def launch(self, spec: WorkerSpec) -> Any:
        usage = self.given[spec.worker_id] = self.usages.pop(0)
        return Reporting(await self.inner.launch(spec), usage)


def samples(collector: RuntimeCollector, family: str) -> dict[str, float]:
    body, _ = render_metrics(collector)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return {s.labels["worker_id"]: s.value for s in families[family].samples}


async def test_the_metrics_show_a_ray_workers_figures_as_its_agent_read_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    full = ProcessUsage(rss_bytes=50_000_000, age_s=12.0)
    partial = ProcessUsage(rss_bytes=None, age_s=3.0)
    async with open_fake_launcher(name="ray") as inner:
        launcher = ReportingLauncher(inner, [full, None, partial])  # None: not reported yet
        async with dspex_trio.open_pool(workers=3, launcher=launcher) as pool:
            assert sorted(launcher.given) == sorted(w.worker_id for w in pool.workers()), launcher.given
            ids = {usage: wid for wid, usage in launcher.given.items()}
            collector = RuntimeCollector(pool)
            # not this machine's /proc (the fake workers' pids are no processes): what the agents read
            assert samples(collector, "dspex_worker_resident_memory_bytes") == {ids[full]: 50_000_000}
            assert samples(collector, "dspex_worker_age_seconds") == {ids[full]: 12.0, ids[partial]: 3.0}
