"""Prometheus metrics (``_metrics.py``, ``_call_metrics.py``): a scrape parsed with prometheus-client's own
text parser has every family with its type; counters move as calls, kills and refusals happen.

In-process: fake workers (``tests/fakes.py``), ``autojump_clock`` where time matters.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import dspex_trio
from dspex_trio._call_metrics import LATENCY_BUCKETS_S, MAX_METHODS, CallMetrics, outcome_of
from dspex_trio._metrics import EXIT_CAUSES, RuntimeCollector, exit_cause, render_metrics
from dspex_trio._states import WorkerState
from tests.fakes import open_fake_launcher
from tests.helpers import wait_until

EXPECTED_TYPES = {
    "dspex_info": "gauge",
    "dspex_workers": "gauge",
    "dspex_pool_size": "gauge",
    "dspex_worker_starts": "counter",
    "dspex_worker_exits": "counter",
    "dspex_worker_restarts": "counter",
    "dspex_workers_recycled": "counter",
    "dspex_worker_in_flight": "gauge",
    "dspex_worker_capacity": "gauge",
    "dspex_worker_resident_memory_bytes": "gauge",
    "dspex_worker_age_seconds": "gauge",
    "dspex_circuit_state": "gauge",
    "dspex_circuit_opened": "counter",
    "dspex_in_flight": "gauge",
    "dspex_queue_depth": "gauge",
    "dspex_sessions": "gauge",
    "dspex_refusals": "counter",
    "dspex_calls_redispatched": "counter",
    "dspex_calls_retried": "counter",
    "dspex_calls": "counter",
    "dspex_call_duration_seconds": "histogram",
    "dspex_lm_requests": "counter",
    "dspex_lm_requests_in_flight": "gauge",
    "dspex_lm_tokens": "counter",
    "dspex_lm_throttled": "counter",
    "dspex_lm_throttled_seconds": "counter",
    "dspex_lm_pauses": "counter",
    "dspex_lm_paused_seconds": "gauge",
    "dspex_lm_leases_refused": "counter",
    "dspex_lm_errors": "counter",
    "dspex_lm_cache_hits": "counter",
    "dspex_lm_fallbacks": "counter",
    "dspex_lm_answered": "counter",
}
"""Every family of a pool's scrape (without a websocket server) and its type, as the parser names it."""


def scrape(collector: RuntimeCollector) -> dict[str, Any]:
    body, content_type = render_metrics(collector)
    assert content_type.startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Any], name: str, sample: str | None = None, **labels: str) -> float:
    """The value of the one sample of family ``name`` (sample name ``sample``, default the family's own
    with ``_total`` for counters) whose labels include ``labels``."""
    family = families[name]
    wanted = sample or (name + "_total" if family.type == "counter" else name)
    found = [
        s.value
        for s in family.samples
        if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, wanted, labels, family.samples)
    return float(found[0])


async def test_every_family_is_there_with_its_type_and_counters_move(autojump_clock: Any) -> None:
    async with (
        open_fake_launcher(capacity=1) as launcher,
        dspex_trio.open_pool(workers=2, launcher=launcher, max_queue=0) as pool,
    ):
        collector = RuntimeCollector(pool)
        before = scrape(collector)
        assert {name: before[name].type for name in EXPECTED_TYPES} == EXPECTED_TYPES
        assert value(before, "dspex_workers", state="ready") == 2
        assert value(before, "dspex_circuit_state", state="closed") == 1
        assert value(before, "dspex_circuit_state", state="open") == 0
        assert value(before, "dspex_pool_size") == 2
        assert before["dspex_calls"].samples == []

        for _ in range(3):
            assert await pool.call("echo", {"value": 1}) == 1
        with pytest.raises(dspex_trio.CallTimeout):
            await pool.call("sleep", {"seconds": 5}, timeout=1)

        # both workers busy, no queue: the next call is refused with Overloaded
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(pool.call, "sleep", {"seconds": 1})
            await wait_until(lambda: pool.statistics().in_flight == 2, 5)
            busy = scrape(collector)
            assert value(busy, "dspex_in_flight") == 2
            assert (
                sum(value(busy, "dspex_worker_in_flight", worker_id=w.worker_id) for w in pool.workers()) == 2
            )
            with pytest.raises(dspex_trio.Overloaded):
                await pool.call("echo", {"value": 2})

        after = scrape(collector)
        assert value(after, "dspex_calls", method="echo", outcome="ok") == 3
        assert value(after, "dspex_calls", method="echo", outcome="Overloaded") == 1
        assert value(after, "dspex_calls", method="sleep", outcome="CallTimeout") == 1
        assert value(after, "dspex_calls", method="sleep", outcome="ok") == 2
        assert value(after, "dspex_refusals", reason="overloaded") == 1
        assert (
            value(after, "dspex_call_duration_seconds", "dspex_call_duration_seconds_count", method="sleep")
            == 3
        )
        # the three sleeps took 1 s (two) and the timeout 1 s: all in the bucket up to 1 s, none below 0.5 s
        assert (
            value(
                after,
                "dspex_call_duration_seconds",
                "dspex_call_duration_seconds_bucket",
                method="sleep",
                le="0.5",
            )
            == 0
        )
        assert (
            value(
                after,
                "dspex_call_duration_seconds",
                "dspex_call_duration_seconds_bucket",
                method="sleep",
                le="+Inf",
            )
            == 3
        )
        assert value(
            after, "dspex_call_duration_seconds", "dspex_call_duration_seconds_sum", method="sleep"
        ) == pytest.approx(3.0, abs=0.05)

        # a worker killed: an exit by cause, a restart, a start of its replacement
        victim = launcher.live[0]
        victim.die(signal=signal.SIGKILL)
        await wait_until(lambda: pool.statistics().restarts == 1 and pool.statistics().ready == 2, 5)
        killed = scrape(collector)
        assert value(killed, "dspex_worker_exits", cause="killed") == 1
        assert value(killed, "dspex_worker_restarts") == 1
        assert value(killed, "dspex_worker_starts") == 3  # the two first ones, and the replacement
        assert value(killed, "dspex_workers", state="ready") == 2


async def test_an_open_circuit_shows_and_refusals_count_as_unavailable(autojump_clock: Any) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(
            workers=1, launcher=launcher, restart_intensity=0, min_healthy_uptime=10, probe_backoff=30
        ) as pool,
    ):
        collector = RuntimeCollector(pool)
        launcher.fail_at_start = 3
        launcher.live[0].die(code=1)
        await wait_until(lambda: pool.circuit is dspex_trio.CircuitState.OPEN, 5)
        with pytest.raises(dspex_trio.PoolUnavailable):
            await pool.call("echo", {"x": 1})
        families = scrape(collector)
        assert value(families, "dspex_circuit_state", state="open") == 1
        assert value(families, "dspex_circuit_opened") >= 1
        assert value(families, "dspex_refusals", reason="unavailable") == 1
        assert value(families, "dspex_calls", method="echo", outcome="PoolUnavailable") == 1
        assert value(families, "dspex_worker_exits", cause="exited") == 1


async def test_lm_requests_tokens_errors_and_throttling_by_lm(autojump_clock: Any) -> None:
    """The LM families follow the pool's budgets book (what workers lease through; docs/lm.md)."""
    budget = dspex_trio.LMBudget(model="openai/m", api_base="http://127.0.0.1:9/v1", max_concurrent=4)
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher, lm_budgets=[budget]) as pool,
    ):
        assert pool.lm_budgets is not None
        collector = RuntimeCollector(pool)
        lm = budget.key
        first = await pool.lm_budgets.acquire(lm, tokens=10)
        busy = scrape(collector)
        assert value(busy, "dspex_lm_requests", lm=lm) == 1
        assert value(busy, "dspex_lm_requests_in_flight", lm=lm) == 1
        pool.lm_budgets.release(first, status=429, retry_after=2.0, tokens=12, sent_ago=0.0)
        paused = scrape(collector)
        assert value(paused, "dspex_lm_errors", lm=lm, status="429") == 1
        assert value(paused, "dspex_lm_errors", lm=lm, status="5xx") == 0
        assert value(paused, "dspex_lm_pauses", lm=lm) == 1
        assert value(paused, "dspex_lm_paused_seconds", lm=lm) > 0
        assert value(paused, "dspex_lm_tokens", lm=lm) == 12
        second = await pool.lm_budgets.acquire(lm)  # waits out the pause (virtual time)
        pool.lm_budgets.release(second, status=200, tokens=3, sent_ago=0.0)
        after = scrape(collector)
        assert value(after, "dspex_lm_requests", lm=lm) == 2
        assert value(after, "dspex_lm_throttled", lm=lm) == 1
        assert value(after, "dspex_lm_throttled_seconds", lm=lm) >= 1.5
        assert value(after, "dspex_lm_requests_in_flight", lm=lm) == 0
        assert value(after, "dspex_lm_tokens", lm=lm) == 15


def test_cache_hits_and_fallbacks_are_counted_from_the_executions_usage() -> None:
    """What completed executions' ``usage`` reports (the workers' cache and fallback chains) is counted on
    the host: the collector reads it at scrape time."""
    from dspex_trio._programs_host import MAX_LM_LABELS, LMUsage

    usage = LMUsage()
    usage.note({"total_tokens": 0, "cache_hits": 2})
    usage.note({"cache_hits": 1, "lm": "b @ http://b", "fallbacks": [{"lm": "a @ http://a", "error": "X"}]})
    usage.note(None)
    usage.note({"cache_hits": True, "fallbacks": "not a list of failures"})  # ignored, not counted
    assert usage.cache_hits == 3
    assert usage.fallbacks == {"a @ http://a": 1}
    assert usage.answered_by == {"b @ http://b": 1}
    for i in range(MAX_LM_LABELS + 5):  # bounded labels
        usage.note({"lm": f"m{i}"})
    # "b" holds one of the labels: 63 of the new ones get theirs, the other 6 count as "other"
    assert len(usage.answered_by) == MAX_LM_LABELS + 1 and usage.answered_by["other"] == 6


async def test_the_collector_reads_the_hosts_lm_usage(autojump_clock: Any) -> None:
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
        collector = RuntimeCollector(pool)
        assert value(scrape(collector), "dspex_lm_cache_hits") == 0
        pool.lm_usage.note({"cache_hits": 4, "lm": "b", "fallbacks": [{"lm": "a", "error": "LMServerError"}]})
        families = scrape(collector)
        assert value(families, "dspex_lm_cache_hits") == 4
        assert value(families, "dspex_lm_fallbacks", lm="a") == 1
        assert value(families, "dspex_lm_answered", lm="b") == 1


async def test_an_application_registers_the_collector_in_its_own_registry(autojump_clock: Any) -> None:
    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
        registry = CollectorRegistry()
        registry.register(dspex_trio.RuntimeCollector(pool))
        assert registry.get_sample_value("dspex_workers", {"state": "ready"}) == 1
        await pool.call("echo", {"x": 1})
        assert registry.get_sample_value("dspex_calls_total", {"method": "echo", "outcome": "ok"}) == 1


async def test_extra_sources_are_collected(autojump_clock: Any) -> None:
    from prometheus_client.metrics_core import CounterMetricFamily

    async with open_fake_launcher() as launcher, dspex_trio.open_pool(workers=1, launcher=launcher) as pool:
        collector = RuntimeCollector(pool)
        collector.add_source(
            lambda: [CounterMetricFamily("dspex_lm_requests", "LM requests.", value=7, labels=None)]
        )
        assert value(scrape(collector), "dspex_lm_requests") == 7


def test_exit_causes_are_a_closed_set() -> None:
    cases = {
        (WorkerState.STOPPED, "exited with code 0"): "stopped",
        (WorkerState.FAILED, "killed by SIGKILL"): "killed",
        (WorkerState.FAILED, "exit code 3"): "exited",
        (WorkerState.FAILED, "no answer to heartbeats for 3.10 s (limit 3 s)"): "unresponsive",
        (WorkerState.FAILED, "call 7 (echo) was not acked within 2 s"): "unresponsive",
        (WorkerState.FAILED, "protocol error: bad magic"): "protocol",
        (WorkerState.FAILED, "no hello within 20 s"): "start_timeout",
    }
    for (state, reason), cause in cases.items():
        assert exit_cause(state, reason) == cause
        assert cause in EXIT_CAUSES


def test_call_metrics_bound_their_method_labels_and_bucket_exactly() -> None:
    metrics = CallMetrics()
    for i in range(MAX_METHODS + 10):
        metrics.observe(f"m{i}", "ok", 0.001)
    assert len(metrics.histograms) == MAX_METHODS + 1
    assert metrics.outcomes["other", "ok"] == 10
    metrics.observe("m0", "ok", LATENCY_BUCKETS_S[-1] + 1)
    pairs = metrics.histograms["m0"].cumulative()
    assert pairs[0] == ("0.0005", 0)
    assert pairs[1] == ("0.001", 1)  # le is inclusive
    assert pairs[-1] == ("+Inf", 2)
    assert outcome_of(dspex_trio.Overloaded("x")) == "Overloaded"
    assert outcome_of(ValueError()) == "error"


def test_importing_the_runtime_does_not_import_prometheus_client() -> None:
    import subprocess
    import sys

    code = (
        "import sys, dspex_trio, bridge_child.wire\n"
        "for name in ('prometheus_client', 'opentelemetry'):\n"
        "    assert name not in sys.modules, name + ' imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
