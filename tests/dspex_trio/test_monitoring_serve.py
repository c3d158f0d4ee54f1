"""Monitoring with real worker processes: ``dspex-trio serve`` answers ``/metrics``, ``/healthz`` and
``/readyz`` on its websocket port and on ``--http-port``, a scraper's token opens ``/metrics`` only, and
a scrape of a real pool shows each worker's RSS and age, and a SIGKILLed worker as an exit by cause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import dspex_trio
from dspex_trio._metrics import RuntimeCollector, render_metrics
from tests.dspex_trio.test_http_routes import get
from tests.helpers import kill_quietly, read_until, wait_until

pytestmark = pytest.mark.real_processes

CLI = [sys.executable, "-m", "dspex_trio"]
START_TIMEOUT_S = 60.0
"""Bound on a real pool (or ``serve``) starting on a busy machine."""


def families(collector: RuntimeCollector) -> dict[str, Any]:
    body, _ = render_metrics(collector)
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(found: dict[str, Any], name: str) -> dict[str, float]:
    return {s.labels.get("worker_id", s.labels.get("cause", "")): s.value for s in found[name].samples}


async def test_a_real_pool_scrape_has_rss_and_age_and_counts_a_killed_worker() -> None:
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=2) as pool:
            collector = RuntimeCollector(pool)
            found = families(collector)
            rss = samples(found, "dspex_worker_resident_memory_bytes")
            ages = samples(found, "dspex_worker_age_seconds")
            ids = {w.worker_id for w in pool.workers()}
            assert set(rss) == ids == set(ages)
            assert all(value > 10 * 2**20 for value in rss.values())  # a worker with dspy: tens of MiB
            assert all(0 <= value < START_TIMEOUT_S + 5 for value in ages.values())

            for _ in range(5):
                await pool.call("ping")
            victim = pool.workers()[0]
            os.kill(victim.pid, signal.SIGKILL)
            await wait_until(lambda: pool.statistics().restarts == 1 and pool.statistics().ready == 2, 30)
            found = families(collector)
            assert samples(found, "dspex_worker_exits")["killed"] == 1
            restarts = found["dspex_worker_restarts"].samples
            assert [s.value for s in restarts if s.name == "dspex_worker_restarts_total"] == [1]
            calls = {(s.labels["method"], s.labels["outcome"]): s.value for s in found["dspex_calls"].samples}
            assert calls[("ping", "ok")] == 5
            assert victim.worker_id not in samples(found, "dspex_worker_resident_memory_bytes")


async def test_serve_answers_the_routes_on_both_ports_with_the_scrapers_token(tmp_path: Any) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text("scrape-me\n")
    env = {**os.environ, "DSPEX_TOKEN": "client-token", "DSPEX_WORKERS": "1"}
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", "0", "--http-port", "0", "--metrics-token-file", str(token_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(START_TIMEOUT_S):
            output = await read_until(
                process.stdout,
                lambda data: data.count(b"\n") >= 2,
                lambda: f"serve exited early: {process.returncode}",
            )
        first, second = output.decode().splitlines()[:2]
        ws_port = int(first.split()[2].rsplit(":", 1)[1])
        assert second.startswith("dspex-trio monitoring http://127.0.0.1:")
        http_port = int(second.split()[2].rsplit(":", 1)[1])
        for port in (ws_port, http_port):
            assert (await get(port, "/metrics"))[0] == 401
            status, _, body = await get(port, "/metrics", "Authorization: Bearer scrape-me")
            assert status == 200 and b"dspex_workers{" in body
            assert (await get(port, "/readyz", "Authorization: Bearer scrape-me"))[0] == 401
            assert (await get(port, "/readyz", "Authorization: Bearer client-token"))[0] == 200
            assert (await get(port, "/"))[0] == 200  # the dashboard page: no token needed
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        kill_quietly(process.pid)


async def test_serve_tracing_exports_the_spans_as_the_otel_variables_say() -> None:
    from tests.dspex_trio.test_tracing import ws_call

    env = {
        **os.environ,
        "DSPEX_WORKERS": "1",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "t-srv",
    }
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", "--port", "0", "--tracing"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(START_TIMEOUT_S):
            output = await read_until(
                process.stdout,
                lambda data: b"\n" in data,
                lambda: f"serve exited early: {process.returncode}",
            )
        url = output.decode().splitlines()[0].split()[2]
        params = {"signature": "question -> answer"}
        reply = await trio.to_thread.run_sync(ws_call, url, "execution/run", params)
        assert "outputs" in reply["result"]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            while chunk := await process.stdout.receive_some(65536):
                output += chunk
            assert await process.wait() == 0
        text = output.decode()
        for name in (
            "dspex.websocket execution/run",
            "dspex.pool execute",
            "dspex.worker execute",
            "dspy.lm request",
        ):
            assert f'"name": "{name}"' in text, name
        assert '"service.name": "t-srv"' in text
    finally:
        kill_quietly(process.pid)


async def test_serve_tracing_names_a_missing_exporter() -> None:
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"}
    result = await trio.run_process(
        [*CLI, "serve", "--port", "0", "--tracing"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    assert result.returncode == 1
    assert b"OTEL_TRACES_EXPORTER='zipkin'" in result.stderr
