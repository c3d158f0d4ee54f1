"""Jobs over the websocket (``job/submit``, ``job/event``, ``job/cancel``, ``job/list``) against a real
pool, driven by a third-party client (the ``websockets`` library, in a thread): the same result as
``pool.evaluate``, progress then one terminal event in ``seq`` order, cancellation, and the operator's
limits (a million-example devset refused by ``max_job_examples`` on a server whose message size
allows it; with the default 1 MiB message size it cannot even arrive: 1009, test_websocket.py). Real processes mean real time: every wait is bounded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosed

import dspex_trio
from tests import jobs_module
from tests.dspex_trio.test_jobs import devset
from tests.dspex_trio.test_websocket import Client, in_thread, start_server
from tests.helpers import wait_until

APP = "tests.jobs_module"
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with dspex_trio.open_pool(workers=2, programs=[APP]) as pool:
        yield pool


def job_events(client: Client, job: str) -> list[dict[str, Any]]:
    """Every ``job/event`` of ``job`` up to its terminal one."""
    events = []
    while True:
        params = client.notification("job/event")
        assert params["job"] == job
        events.append(params)
        if params["event"] in TERMINAL:
            return events


def submit_and_follow(url: str, program: str, examples: Any, **extra: Any) -> tuple[Any, list[Any], Any]:
    with Client(url) as client:
        session = client.open_session()
        pid = client.result("program/create", {"module": program, "session": session})["program"]
        job = client.result(
            "job/submit",
            {"kind": "evaluate", "program": pid, "session": session, "metric": "agrees", "devset": examples}
            | extra,
        )["job"]
        events = job_events(client, job)
        listed = client.result("job/list")["jobs"]
        return job, events, listed


async def test_an_evaluation_job_gives_the_pool_s_result_with_progress_then_one_terminal_event(
    pool: dspex_trio.Pool,
) -> None:
    examples = devset(300)
    pid = await pool.create_program(module="qa")
    async with pool.evaluate(pid, examples, metric="agrees") as local:
        expected = await local.wait()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        job, events, listed = await in_thread(submit_and_follow, server.url, "qa", examples)
        nursery.cancel_scope.cancel()
    assert job.startswith("j_")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["event"] for e in events[:-1]} == {"progress"}
    assert events[-1]["event"] == "completed"
    done = [e["data"]["done"] for e in events[:-1]]
    assert done == sorted(done) and all(e["data"]["total"] == 300 for e in events[:-1])
    result = events[-1]["data"]
    assert result["score"] == expected.score
    assert [r["score"] for r in result["results"]] == [r.score for r in expected.results]
    assert listed == [
        {
            "job": job,
            "kind": "evaluate",
            "program": listed[0]["program"],
            "state": "completed",
            "progress": {"done": 300, "total": 300, "errors": 0, "score": listed[0]["progress"]["score"]},
        }
    ]


def cancel_mid_job(url: str) -> tuple[list[Any], Any, Any]:
    with Client(url) as client:
        session = client.open_session()
        slow = client.result("program/create", {"module": "slow", "session": session})["program"]
        qa = client.result("program/create", {"module": "qa", "session": session})["program"]
        job = client.result(
            "job/submit",
            {
                "kind": "evaluate",
                "program": slow,
                "session": session,
                "metric": "agrees",
                "devset": devset(500),
                "concurrency": 4,
            },
        )["job"]
        first = client.notification("job/event")
        assert first["event"] == "progress"
        served = client.result(
            "execution/run", {"program": qa, "session": session, "inputs": {"question": "hi?"}}
        )
        assert client.result("job/cancel", {"job": job}) == {"job": job, "cancelled": True}
        events = [first, *job_events(client, job)]
        again = client.result("job/cancel", {"job": job})
        return events, served, again


async def test_job_cancel_ends_the_job_with_cancelled_and_the_pool_serves_others(
    pool: dspex_trio.Pool,
) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        events, served, again = await in_thread(cancel_mid_job, server.url)
        nursery.cancel_scope.cancel()
    assert served["outputs"]["answer"]
    assert events[-1]["event"] == "cancelled"
    assert events[-1]["data"] == {"reason": "cancelled by the client"}
    assert events[-1]["data"] and events[-2]["data"]["done"] < 500
    assert again["cancelled"] is False and again["state"] == "cancelled"


def refusals(url: str) -> dict[str, Any]:
    with Client(url) as client:
        session = client.open_session()
        pid = client.result("program/create", {"module": "qa", "session": session})["program"]
        base = {"kind": "evaluate", "program": pid, "session": session, "metric": "agrees"}
        out = {
            "unknown metric": client.error("job/submit", base | {"metric": "nope", "devset": devset(2)}),
            "missing input": client.error("job/submit", base | {"devset": [{"inputs": {}, "labels": {}}]}),
            "empty": client.error("job/submit", base | {"devset": []}),
            "kind": client.error("job/submit", base | {"kind": "train", "devset": devset(2)}),
            "too many": client.error("job/submit", base | {"devset": devset(11)}),
            "unknown job": client.error("job/cancel", {"job": "j_nope"}),
        }
        million = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 99,
                "method": "job/submit",
                "params": base | {"devset": [{"inputs": {"question": "q"}}] * 1_000_000},
            }
        )
        client.ws.send(million)
        out["million"] = client.reply(99)
        slow = client.result("program/create", {"module": "slow", "session": session})["program"]
        long = base | {"program": slow, "devset": devset(8), "concurrency": 1}  # 1.6 s each
        out["jobs"] = [client.result("job/submit", long) for _ in range(2)]
        out["jobs at once"] = client.error("job/submit", long)
        return out


async def test_bad_jobs_and_the_limits_are_refused_before_anything_runs(pool: dspex_trio.Pool) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(
            nursery, pool, max_job_examples=10, max_jobs=2, max_message_size=64 * 1024 * 1024
        )
        out = await in_thread(refusals, server.url)
        nursery.cancel_scope.cancel()
    assert "unknown metric 'nope'" in out["unknown metric"]["message"]
    assert "devset[0] is missing input field(s) 'question'" in out["missing input"]["message"]
    assert "empty devset" in out["empty"]["message"]
    assert "unknown job kind 'train'" in out["kind"]["message"]
    assert out["too many"]["data"]["kind"] == "limit_exceeded"
    assert out["unknown job"]["data"]["kind"] == "unknown_execution"
    assert out["jobs at once"]["data"]["kind"] == "limit_exceeded"
    assert "at most 2 jobs" in out["jobs at once"]["message"]
    assert out["million"]["error"]["data"]["kind"] == "limit_exceeded"
    assert "1000000 examples; at most 10" in out["million"]["error"]["message"]


def compile_over_ws(url: str, trainset: Any) -> tuple[list[Any], Any, Any]:
    with Client(url) as client:
        session = client.open_session()
        pid = client.result("program/create", {"module": "qa", "session": session})["program"]
        params = {
            "kind": "compile",
            "program": pid,
            "session": session,
            "metric": "agrees",
            "optimizer": "bootstrap_few_shot",
            "trainset": trainset,
            "options": {"max_bootstrapped_demos": 2, "max_labeled_demos": 4},
        }
        job = client.result("job/submit", params)["job"]
        events = job_events(client, job)
        state = client.result("program/get", {"program": events[-1]["data"]["program"], "session": session})
        refused = client.error("job/submit", params | {"optimizer": "gepa"})
        return events, state, refused


async def test_a_compile_job_over_the_websocket_creates_the_optimized_program(pool: dspex_trio.Pool) -> None:
    trainset = devset(12)
    pid = await pool.create_program(module="qa")
    options = {"max_bootstrapped_demos": 2, "max_labeled_demos": 4}
    async with pool.compile(
        pid, optimizer="bootstrap_few_shot", trainset=trainset, metric="agrees", options=options
    ) as local:
        expected = await local.wait()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        events, described, refused = await in_thread(compile_over_ws, server.url, trainset)
        nursery.cancel_scope.cancel()
    assert events[-1]["event"] == "completed"
    assert {e["event"] for e in events[:-1]} <= {"progress"}
    assert events[-1]["data"]["state"]["demos"] == expected.state["demos"]
    assert described["id"] == events[-1]["data"]["program"]
    assert "unknown option(s) 'max_bootstrapped_demos'" in refused["message"], refused
    assert "of gepa" in refused["message"], refused


def mipro_over_ws(url: str, options: dict[str, Any], train: Any, val: Any) -> list[Any]:
    with Client(url) as client:
        session = client.open_session()
        pid = client.result("program/create", {"module": "tuned", "session": session})["program"]
        params = {
            "kind": "compile",
            "program": pid,
            "session": session,
            "metric": "agrees",
            "optimizer": "mipro_v2",
            "trainset": train,
            "valset": val,
            "options": options,
        }
        return job_events(client, client.result("job/submit", params)["job"])


async def test_a_mipro_v2_job_over_the_websocket_reports_its_trials(pool: dspex_trio.Pool) -> None:
    from tests.dspex_trio.test_compile_mipro import OPTIONS, TRAIN, VAL, dspy_mipro, dspy_trials

    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        events = await in_thread(mipro_over_ws, server.url, OPTIONS, TRAIN, VAL)
        nursery.cancel_scope.cancel()
    theirs = dspy_mipro(OPTIONS)
    assert events[-1]["event"] == "completed", events[-1]
    done = events[-1]["data"]
    trials = [(c["trial"], c["score"], None if c["full_eval"] else c["params"]) for c in done["candidates"]]
    assert trials == dspy_trials(theirs)
    assert done["score"] == theirs.score
    progress = [e["data"] for e in events[:-1]]
    assert {e["event"] for e in events[:-1]} == {"progress"}
    keys = {"stage", "trials", "total_trials", "bootstrapped", "best_score", "done", "total", "score"}
    assert progress and all(set(p) == keys for p in progress), progress
    # coalesced (at most one per job_progress_interval): which stages are seen depends on the machine
    assert {p["stage"] for p in progress} <= {"bootstrap", "propose", "search"}


def failing_then_abandoned(url: str) -> list[Any]:
    with Client(url) as client:
        session = client.open_session()
        fragile = client.result("program/create", {"module": "fragile", "session": session})["program"]
        slow = client.result("program/create", {"module": "slow", "session": session})["program"]
        base = {"kind": "evaluate", "session": session, "metric": "agrees"}
        job = client.result(
            "job/submit", base | {"program": fragile, "devset": devset(20, boom=(0,)), "max_errors": 1}
        )["job"]
        events = job_events(client, job)
        client.result("job/submit", base | {"program": slow, "devset": devset(200), "concurrency": 4})
        assert client.notification("job/event")["event"] == "progress"
    return events  # the connection closed with the slow job running


async def test_a_failed_job_ends_with_failed_and_a_closed_connection_cancels_its_jobs(
    pool: dspex_trio.Pool,
) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        events = await in_thread(failing_then_abandoned, server.url)

        async def idle() -> bool:
            stats = [await w.call("stats") for w in pool.workers()]
            return all(not s["executing"] and not s["pending"] for s in stats)

        await wait_until(
            idle, timeout=1.0 + jobs_module.SLOW_S, message="the closed connection's job stopped"
        )
        nursery.cancel_scope.cancel()
    assert events[-1]["event"] == "failed"
    assert events[-1]["data"]["error"] == "JobFailed"
    assert "1 examples failed (max_errors 1)" in events[-1]["data"]["message"]


async def test_the_remote_client_runs_jobs_as_the_pool_does(pool: dspex_trio.Pool) -> None:
    examples = devset(120, boom=(3,))
    pid = await pool.create_program(module="fragile")
    async with pool.evaluate(pid, examples, metric="agrees") as local:
        expected = await local.wait()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        async with dspex_trio.connect(server.url) as remote:
            rid = await remote.create_program(module="fragile")
            async with remote.evaluate(rid, examples, metric="agrees") as job:
                seen = [p async for p in job]
            result = job.result
            async with remote.compile(
                rid, optimizer="bootstrap_few_shot", trainset=examples[:12], metric="agrees"
            ) as job:
                compiled = await job.wait()
            assert (await remote.get_program(compiled.program))["id"] == compiled.program
            with pytest.raises(dspex_trio.InvalidParams, match="unknown metric"):
                async with remote.evaluate(rid, examples, metric="nope"):
                    pass
            slow = await remote.create_program(module="slow")
            async with remote.evaluate(slow, devset(200), metric="agrees", concurrency=4) as job:
                async for _progress in job:
                    break  # leaving early cancels it on the server
            with pytest.raises(dspex_trio.JobCancelled):
                job.result  # noqa: B018

            async def idle() -> bool:
                stats = [await w.call("stats") for w in pool.workers()]
                return all(not s["executing"] and not s["pending"] for s in stats)

            await wait_until(idle, timeout=2.0 + jobs_module.SLOW_S, message="the left job stopped")
        nursery.cancel_scope.cancel()
    assert result.score == expected.score and result.errors == 1
    assert [r.score for r in result.results] == [r.score for r in expected.results]
    assert seen and seen[-1].done <= 120
    assert compiled.state["respond"]["demos"]


def until_shutdown(url: str, running: Any) -> tuple[list[Any], int | None]:
    with Client(url) as client:
        session = client.open_session()
        slow = client.result("program/create", {"module": "slow", "session": session})["program"]
        params = {"kind": "evaluate", "program": slow, "session": session, "metric": "agrees"}
        job = client.result("job/submit", params | {"devset": devset(200), "concurrency": 2})["job"]
        events = [client.notification("job/event")]
        trio.from_thread.run_sync(running.set)
        events += job_events(client, job)
        with pytest.raises(ConnectionClosed) as closed:
            client.recv()
        return events, closed.value.rcvd.code if closed.value.rcvd else None


async def test_the_server_s_shutdown_ends_a_job_with_cancelled_before_closing(pool: dspex_trio.Pool) -> None:
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, pool)
        running = trio.Event()

        async def shut_down_once_running() -> None:
            with trio.fail_after(20):
                await running.wait()
                await server.shutdown()

        nursery.start_soon(shut_down_once_running)
        with trio.fail_after(30):
            events, code = await in_thread(until_shutdown, server.url, running)
        nursery.cancel_scope.cancel()
    assert events[-1] == {**events[-1], "event": "cancelled", "data": {"reason": "server_shutdown"}}
    assert code == 1001
