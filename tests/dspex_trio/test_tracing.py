"""Tracing (``_tracing.py``, ``bridge_child/_tracing.py``): one websocket execution on a real pool gives
one trace whose spans cover the server, the pool, the worker, each predictor and each LM request, with
their parents intact; exported through the SDK's in-memory exporter. Off, nothing is traced and no trace
context reaches the worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import dspex_trio
from dspex_trio import _tracing
from dspex_trio._tracing import ingest_worker_spans

pytestmark = pytest.mark.real_processes

START_TIMEOUT_S = 60.0


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _tracing.enable_tracing(provider)
    try:
        yield exporter
    finally:
        _tracing.disable_tracing()


def ws_call(url: str, method: str, params: dict[str, Any]) -> Any:
    from websockets.sync.client import connect

    with connect(url, subprotocols=["dspex.v1"], open_timeout=10) as ws:
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "program/create", "params": params}))
        program = json.loads(ws.recv(timeout=30))["result"]["program"]
        inputs = {"question": "What is traced?"}
        ws.send(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": method,
                    "params": {"program": program, "inputs": inputs},
                }
            )
        )
        return json.loads(ws.recv(timeout=30))


async def test_one_websocket_execution_is_one_trace_from_the_server_to_each_lm_request(
    exporter: InMemorySpanExporter,
) -> None:
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool, trio.open_nursery() as nursery:
            server = await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0))
            worker_pid = pool.workers()[0].pid
            params = {"signature": "question -> answer", "module": "chain_of_thought"}
            reply = await trio.to_thread.run_sync(ws_call, server.url, "execution/run", params)
            assert "trace_spans" not in json.dumps(reply)  # the worker's spans never reach the client
            assert set(reply["result"]["outputs"]) == {"reasoning", "answer"}
            nursery.cancel_scope.cancel()

    spans = exporter.get_finished_spans()
    run = [s for s in spans if s.name == "dspex.websocket execution/run"]
    assert len(run) == 1
    trace_id = run[0].context.trace_id
    ours = [s for s in spans if s.context.trace_id == trace_id]
    by_id = {s.context.span_id: s for s in ours}
    names = [s.name for s in ours]

    def parent_name(span: Any) -> str | None:
        return by_id[span.parent.span_id].name if span.parent is not None else None

    assert run[0].parent is None and run[0].kind.name == "SERVER"
    (pool_span,) = [s for s in ours if s.name == "dspex.pool execute"]
    assert parent_name(pool_span) == "dspex.websocket execution/run"
    (worker_span,) = [s for s in ours if s.name == "dspex.worker execute"]
    assert parent_name(worker_span) == "dspex.pool execute"
    assert worker_span.attributes["dspex.worker.pid"] == worker_pid
    (program_span,) = [s for s in ours if s.name == "dspy.module ChainOfThought"]
    assert parent_name(program_span) == "dspex.worker execute"
    predictors = [s for s in ours if s.name == "dspy.module Predict"]
    assert predictors and all(parent_name(s) == "dspy.module ChainOfThought" for s in predictors)
    lm_requests = [s for s in ours if s.name == "dspy.lm request"]
    assert lm_requests and all(parent_name(s) == "dspy.module Predict" for s in lm_requests)
    assert all(s.attributes["gen_ai.request.model"] for s in lm_requests)
    # every span of the trace has its parent in the trace (or is the root), and starts within it
    for span in ours:
        assert span.parent is None or span.parent.span_id in by_id, (span.name, names)
        assert span.start_time >= run[0].start_time - 50_000_000  # worker clocks: same machine
        assert span.end_time >= span.start_time


async def test_off_nothing_is_traced_and_calls_carry_no_trace_context() -> None:
    assert _tracing.STATE.tracer is None
    assert _tracing.current_traceparent() == ""
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool:
            pid = await pool.create_program("question -> answer", session="s")
            answer = await pool.execute(pid, {"question": "q"}, session="s", with_usage=True)
            assert "trace_spans" not in answer


def test_malformed_worker_spans_are_skipped(exporter: InMemorySpanExporter) -> None:
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    good = {
        "name": "x",
        "span_id": "c" * 16,
        "parent_id": "b" * 16,
        "start_ns": 1,
        "end_ns": 2,
        "attributes": {"k": "v", "bad": {"nested": 1}},
        "error": None,
    }
    bad = [
        "not a dict",
        {**good, "span_id": "zz"},
        {**good, "end_ns": 0},
        {**good, "name": 3},
    ]
    assert ingest_worker_spans([good, *bad], traceparent) == 1
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_id == int("a" * 32, 16) and span.parent.span_id == int("b" * 16, 16)
    assert dict(span.attributes) == {"k": "v"}
    assert ingest_worker_spans("nonsense", traceparent) == 0


def submit_streamed(url: str) -> str:
    from websockets.sync.client import connect

    with connect(url, subprotocols=["dspex.v1"], open_timeout=10) as ws:
        create = {"signature": "question -> answer", "module": "chain_of_thought"}
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "program/create", "params": create}))
        program = json.loads(ws.recv(timeout=30))["result"]["program"]
        params = {"program": program, "inputs": {"question": "q"}}  # stream: true by default
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "execution/submit", "params": params}))
        while True:
            message = json.loads(ws.recv(timeout=30))
            event = message.get("params", {}).get("event")
            if event in ("completed", "failed", "cancelled"):
                assert "trace_spans" not in json.dumps(message)
                return str(event)


async def test_a_streamed_execution_is_one_trace_too(exporter: InMemorySpanExporter) -> None:
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool, trio.open_nursery() as nursery:
            server = await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0))
            assert await trio.to_thread.run_sync(submit_streamed, server.url) == "completed"
            nursery.cancel_scope.cancel()
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "dspex.websocket execution/submit"]
    ours = {s.context.span_id: s for s in spans if s.context.trace_id == root.context.trace_id}
    parents = {s.name: ours[s.parent.span_id].name for s in ours.values() if s.parent is not None}
    assert parents["dspex.pool execute"] == "dspex.websocket execution/submit"  # a stream's own pool span
    assert parents["dspex.worker execute"] == "dspex.pool execute"
    assert parents["dspy.module ChainOfThought"] == "dspex.worker execute"
    assert parents["dspy.module Predict"] == "dspy.module ChainOfThought"
    assert parents["dspy.lm request"] == "dspy.module Predict"


async def test_an_execution_on_the_asynchronous_lane_is_traced_inside_the_worker(
    exporter: InMemorySpanExporter,
) -> None:
    """The asynchronous lane (``async_capacity``: DSPy's ``acall`` on the worker's event loop, a network
    LM) records the worker's spans as the thread path does."""
    from dspex_trio.testing import open_fake_lm

    with trio.fail_after(START_TIMEOUT_S):
        async with (
            open_fake_lm(latency_s=0.01) as fake,
            dspex_trio.open_pool(workers=1, async_capacity=8) as pool,
        ):
            await pool.configure_lm("openai/fake", api_base=fake.url, api_key="test-key", num_retries=0)
            pid = await pool.create_program("question -> answer", module="chain_of_thought")
            with _tracing.span("test root") as _root:
                outputs = await pool.execute(pid, {"question": "What is traced?"})
            [stats] = [await worker.call("stats") for worker in pool.workers()]
    assert set(outputs) == {"reasoning", "answer"}
    assert stats["aio_calls"] == 1  # it did run on the lane
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "test root"]
    ours = {s.context.span_id: s for s in spans if s.context.trace_id == root.context.trace_id}
    parents = {s.name: ours[s.parent.span_id].name for s in ours.values() if s.parent is not None}
    assert parents["dspex.worker execute"] == "dspex.pool execute"
    assert parents["dspy.module ChainOfThought"] == "dspex.worker execute"
    assert parents["dspy.module Predict"] == "dspy.module ChainOfThought"
    assert parents["dspy.lm request"] == "dspy.module Predict"


def statuses(spans: Any) -> dict[str, str]:
    return {s.name: s.status.status_code.name for s in spans}


async def test_a_failed_call_returns_the_workers_spans_marked_as_errors(
    exporter: InMemorySpanExporter,
) -> None:
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool:
            # an LM with no key: DSPy's predictor fails inside the worker (LMNotConfiguredError), nothing sent
            await pool.configure_lm("openai/fake", session="nokey", api_base="http://127.0.0.1:9")
            program = await pool.create_program("question -> answer", session="nokey")
            exporter.clear()
            with pytest.raises(dspex_trio.ProgramError) as caught:
                await pool.execute(program, {"question": "q"}, session="nokey")
            assert "trace_spans" not in repr(caught.value.details)  # exported, never the caller's
            plain = exporter.get_finished_spans()
            exporter.clear()
            with pytest.raises(dspex_trio.ProgramError):  # the same, streamed
                async with pool.stream(program, {"question": "q"}, session="nokey") as events:
                    async for _ in events:
                        pass
            streamed = exporter.get_finished_spans()
    for spans in (plain, streamed):
        (root,) = [s for s in spans if s.parent is None]
        assert root.name == "dspex.pool execute"
        ours = {s.context.span_id: s for s in spans if s.context.trace_id == root.context.trace_id}
        assert len(ours) == len(spans)  # one trace
        parents = {s.name: ours[s.parent.span_id].name for s in ours.values() if s.parent is not None}
        assert parents["dspex.worker execute"] == "dspex.pool execute"
        assert parents["dspy.module Predict"] == "dspex.worker execute"
        status = statuses(spans)
        assert status["dspex.pool execute"] == status["dspex.worker execute"] == "ERROR"
        assert status["dspy.module Predict"] == "ERROR"


async def test_a_timed_out_call_marks_its_pool_span_as_an_error(exporter: InMemorySpanExporter) -> None:
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1, diagnostics=True) as pool:
            with pytest.raises(dspex_trio.CallTimeout):
                await pool.call("sleep", {"seconds": 5}, timeout=0.2)
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "dspex.pool sleep"]
    assert span.status.status_code.name == "ERROR" and span.status.description


def requests(url: str) -> dict[str, Any]:
    from websockets.sync.client import connect

    with connect(url, subprotocols=["dspex.v1"], open_timeout=10) as ws:
        create = {"signature": "question -> answer"}
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "program/create", "params": create}))
        created = json.loads(ws.recv(timeout=30))
        ws.send(
            json.dumps({"jsonrpc": "2.0", "id": 2, "method": "program/get", "params": {"program": "nope"}})
        )
        return {"created": created, "missing": json.loads(ws.recv(timeout=30))}


async def test_requests_that_are_no_execution_get_a_websocket_span(exporter: InMemorySpanExporter) -> None:
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool, trio.open_nursery() as nursery:
            server = await nursery.start(partial(dspex_trio.serve_websocket, pool, port=0))
            exporter.clear()
            replies = await trio.to_thread.run_sync(requests, server.url)
            nursery.cancel_scope.cancel()
    assert "result" in replies["created"] and "error" in replies["missing"]
    spans = exporter.get_finished_spans()
    roots = {s.name: s for s in spans if s.parent is None}
    assert set(roots) == {"dspex.websocket program/create", "dspex.websocket program/get"}
    assert all(s.kind.name == "SERVER" for s in roots.values())
    create = roots["dspex.websocket program/create"]
    trace = {s.context.span_id for s in spans if s.context.trace_id == create.context.trace_id}
    below = [s for s in spans if s.context.trace_id == create.context.trace_id and s is not create]
    assert any(s.name.startswith("dspex.pool ") and s.parent.span_id == create.context.span_id for s in below)
    assert all(s.parent.span_id in trace for s in below)  # its worker call, in its trace
    assert create.status.status_code.name == "UNSET"
    assert roots["dspex.websocket program/get"].status.status_code.name == "ERROR"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spans=json_values, trace=st.text(max_size=60))
def test_whatever_a_worker_returns_as_spans_never_breaks_the_host(
    exporter: InMemorySpanExporter, spans: Any, trace: str
) -> None:
    from bridge_child._tracing import parse_traceparent_untrusted

    parsed = parse_traceparent_untrusted(trace)
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    assert parsed is None or (len(parsed[0]), len(parsed[1])) == (32, 16)
    assert 0 <= ingest_worker_spans(spans, traceparent) <= 256
