"""``--log-format json`` lines say what they are about (``_log_context.py``): ``worker_id`` for a
worker's own tasks, ``execution`` and ``session`` for an execution's, ``trace_id`` while tracing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import dspex_trio
from dspex_trio import _cli, _log_context
from tests.fakes import open_fake_launcher
from tests.helpers import wait_until


class Lines(logging.Handler):
    """The JSON lines ``--log-format json`` would write, formatted as they are emitted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(_cli._JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger("dspex_trio")
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


def test_fields_are_bound_per_block_and_absent_outside() -> None:
    assert _log_context.fields() == {}
    with _log_context.bound(worker_id="w7"), _log_context.bound(execution="e_1"):
        assert _log_context.fields() == {"worker_id": "w7", "execution": "e_1"}
    assert _log_context.fields() == {}


async def test_a_workers_own_lines_carry_its_id(lines: Lines, autojump_clock: Any) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher, heartbeat_interval=1, heartbeat_missed=3) as pool,
    ):
        victim = pool.workers()[0]
        launcher.live[0].go_silent()
        await wait_until(lambda: pool.statistics().restarts == 1, 30)
        killed = [line for line in lines.lines if "killing it" in line["message"]]
        assert killed and killed[0]["worker_id"] == victim.worker_id
        assert all("execution" not in line for line in lines.lines)


async def test_the_supervisors_lines_about_a_worker_carry_its_id(lines: Lines, autojump_clock: Any) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher) as pool,
    ):
        (first,) = pool.workers()
        launcher.live[0].die(signal=9)
        await wait_until(lambda: pool.statistics().restarts == 1 and pool.statistics().ready == 1, 30)
        (second,) = pool.workers()

    def about(text: str) -> dict[str, Any]:
        (line,) = [
            line for line in lines.lines if line["logger"] == "dspex_trio.pool" and text in line["message"]
        ]
        return line

    assert about(f"worker {first.worker_id} (pid {first.pid}) started")["worker_id"] == first.worker_id
    assert about("starting a replacement")["worker_id"] == first.worker_id
    assert about(f"replaced worker {first.worker_id}")["worker_id"] == second.worker_id


async def test_a_failed_start_is_logged_with_the_workers_id(lines: Lines, autojump_clock: Any) -> None:
    async with (
        open_fake_launcher() as launcher,
        dspex_trio.open_pool(workers=1, launcher=launcher) as pool,
    ):
        launcher.fail_at_start = 3
        launcher.live[0].die(signal=9)
        await wait_until(lambda: len(launcher.processes) >= 3, 30)
        launcher.fail_at_start = None
        await wait_until(lambda: pool.statistics().ready == 1, 60)
    failed = [line for line in lines.lines if line["message"].startswith("slot 0: ")]
    assert failed
    for line in failed:
        assert line["message"].startswith(f"slot 0: worker {line['worker_id']} ")


@pytest.mark.real_processes
async def test_an_executions_lines_carry_its_id_session_and_trace(lines: Lines) -> None:
    from websockets.sync.client import connect

    def failing_execution(url: str) -> dict[str, Any]:
        with connect(url, subprotocols=["dspex.v1"], open_timeout=10) as ws:
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "session/open"}))
            session = json.loads(ws.recv(timeout=30))["result"]["session"]
            create = {"signature": "question -> answer", "session": session}
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "program/create", "params": create}))
            program = json.loads(ws.recv(timeout=30))["result"]["program"]
            params = {"program": program, "inputs": {"wrong": 1}, "session": session}
            ws.send(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "execution/submit", "params": params}))
            while True:
                message = json.loads(ws.recv(timeout=30))
                if message.get("params", {}).get("event") == "failed":
                    return {"session": session, "execution": message["params"]["execution"]}

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dspex_trio.enable_tracing(provider)
    try:
        with trio.fail_after(60):
            async with dspex_trio.open_pool(workers=1) as pool, trio.open_nursery() as nursery:
                server = await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0))
                seen = await trio.to_thread.run_sync(failing_execution, server.url)
                nursery.cancel_scope.cancel()
    finally:
        dspex_trio.disable_tracing()
    (failed,) = [line for line in lines.lines if line["message"].startswith(f"execution {seen['execution']}")]
    assert failed["execution"] == seen["execution"]
    assert failed["session"] == seen["session"][:8] + "…"  # a minted session is a capability: its prefix only
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "dspex.websocket execution/submit"]
    assert failed["trace_id"] == f"{span.context.trace_id:032x}"
