"""Model fallback (``bridge_child._lm_fallback``): an LM configuration with ``fallbacks`` moves each LM
request to the next LM on a provider failure. Real workers against two (or three) ``fake-lm``
servers, real time, on the thread path and on the asynchronous lane.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio.testing import open_fake_lm
from dspex_trio.testing._fake_lm import FakeLM

pytestmark = pytest.mark.real_processes

RUN_TIMEOUT_S = 60.0
"""Bound on each test's pool work on a busy machine, in seconds."""


@pytest.fixture
async def primary() -> AsyncIterator[FakeLM]:
    async with open_fake_lm() as server:
        yield server


@pytest.fixture
async def secondary() -> AsyncIterator[FakeLM]:
    async with open_fake_lm() as server:
        yield server


def lm(fake: FakeLM, model: str, key: str) -> dict[str, Any]:
    return {"model": model, "api_base": fake.url, "api_key": key, "num_retries": 0}


def closed_port_url() -> str:
    """An API base on loopback where nothing listens (a connect error)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize(("status", "error"), [(500, "LMServerError"), (429, "LMRateLimitError")])
@pytest.mark.parametrize("async_capacity", [0, 8], ids=["threads", "lane"])
async def test_a_500_or_429_moves_to_the_next_lm_which_is_named(
    primary: FakeLM, secondary: FakeLM, async_capacity: int, status: int, error: str
) -> None:
    with trio.fail_after(RUN_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1, async_capacity=async_capacity) as pool:
            first = lm(primary, "openai/first", "key-one")
            await pool.configure_lm(**first, fallbacks=[lm(secondary, "openai/second", "key-two")])
            pid = await pool.create_program("question -> answer")
            primary.configure(fail_status=status)
            result = await pool.execute(pid, {"question": "who answers?"}, with_usage=True)
            [stats] = [await worker.call("stats") for worker in pool.workers()]
    assert result["outputs"]["answer"]
    assert result["usage"]["lm"] == f"openai/second @ {secondary.url}"
    assert result["usage"]["lms"] == [f"openai/second @ {secondary.url}"]  # its one LM request
    assert result["usage"]["fallbacks"] == [{"lm": f"openai/first @ {primary.url}", "error": error}]
    assert result["usage"]["total_tokens"] > 0
    assert primary.statistics.failures_injected == 1
    assert secondary.statistics.completions == 1
    assert stats["aio_calls"] == (1 if async_capacity else 0)  # the path the parameter asked for


async def test_every_lm_down_is_a_typed_error_naming_each_in_order(primary: FakeLM) -> None:
    dead = closed_port_url()
    with trio.fail_after(RUN_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool:
            await pool.configure_lm(
                **lm(primary, "openai/first", "key-one"),
                fallbacks=[
                    {"model": "openai/second", "api_base": dead, "api_key": "key-two", "num_retries": 0}
                ],
            )
            pid = await pool.create_program("question -> answer")
            primary.configure(fail_status=500)
            with pytest.raises(dspex_trio.AllLMsFailed) as caught:
                await pool.execute(pid, {"question": "anyone?"})
    error = caught.value
    assert isinstance(error, dspex_trio.ProgramError) and error.error_type == "AllLMsFailed"
    assert [t["lm"] for t in error.tried] == [f"openai/first @ {primary.url}", f"openai/second @ {dead}"]
    assert error.tried[0]["error"] == "LMServerError"
    assert error.tried[1]["error"] not in ("", "LMServerError")  # the connect error, as DSPy names it
    assert "openai/first" in str(error) and "openai/second" in str(error)
    assert "key-one" not in str(error) and "key-two" not in str(error)


async def test_a_400_is_the_requests_fault_and_does_not_fall_back(primary: FakeLM, secondary: FakeLM) -> None:
    with trio.fail_after(RUN_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1, async_capacity=8) as pool:
            await pool.configure_lm(
                **lm(primary, "openai/first", "key-one"), fallbacks=[lm(secondary, "openai/second", "k2")]
            )
            pid = await pool.create_program("question -> answer")
            primary.configure(fail_status=400)
            with pytest.raises(dspex_trio.ProgramError) as caught:
                await pool.execute(pid, {"question": "bad"})
    assert not isinstance(caught.value, dspex_trio.AllLMsFailed)
    assert caught.value.error_type == "LMInvalidRequestError"
    assert primary.statistics.completions == 1
    assert secondary.statistics.completions == 0


async def test_the_order_is_kept_and_each_lm_has_its_own_budget(primary: FakeLM, secondary: FakeLM) -> None:
    # A chain of three with pool budgets (workers lease): 500 from the first, 503 from the second, the
    # third answers; each LM is its own budget key, as the pool's statistics show.
    async with open_fake_lm() as third:
        budgets = [
            dspex_trio.LMBudget(model=f"openai/{name}", api_base=fake.url, max_concurrent=4)
            for name, fake in (("first", primary), ("second", secondary), ("third", third))
        ]
        with trio.fail_after(RUN_TIMEOUT_S):
            async with dspex_trio.open_pool(workers=1, lm_budgets=budgets) as pool:
                await pool.configure_lm(
                    **lm(primary, "openai/first", "k1"),
                    fallbacks=[lm(secondary, "openai/second", "k2"), lm(third, "openai/third", "k3")],
                )
                pid = await pool.create_program("question -> answer")
                primary.configure(fail_status=500)
                secondary.configure(fail_status=503)
                result = await pool.execute(pid, {"question": "in order"}, with_usage=True)
                by_lm = {s.lm: s for s in pool.statistics().lm}
        assert result["usage"]["lm"] == f"openai/third @ {third.url}"
        assert [f["lm"] for f in result["usage"]["fallbacks"]] == [
            f"openai/first @ {primary.url}",
            f"openai/second @ {secondary.url}",
        ]
        assert primary.arrival_times[0] < secondary.arrival_times[0] < third.arrival_times[0]
        assert by_lm[f"openai/first @ {primary.url}"].server_errors == 1
        assert by_lm[f"openai/second @ {secondary.url}"].server_errors == 1
        assert by_lm[f"openai/third @ {third.url}"].granted == 1
        assert by_lm[f"openai/third @ {third.url}"].server_errors == 0


async def test_a_streamed_execution_falls_back_before_its_first_chunk(
    primary: FakeLM, secondary: FakeLM
) -> None:
    with trio.fail_after(RUN_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool:
            await pool.configure_lm(
                **lm(primary, "openai/first", "k1"), fallbacks=[lm(secondary, "openai/second", "k2")]
            )
            pid = await pool.create_program("question -> answer")
            primary.configure(fail_status=502)
            async with pool.stream(pid, {"question": "streamed"}) as events:
                seen = [event async for event in events]
    assert any(event["event"] == "chunk" for event in seen)
    completed = seen[-1]
    assert completed["event"] == "completed" and completed["outputs"]["answer"]
    assert completed["usage"]["lm"] == f"openai/second @ {secondary.url}"
    assert primary.statistics.failures_injected == 1 and secondary.statistics.completions == 1


async def test_a_websocket_client_selects_a_chain_by_its_name_only(
    primary: FakeLM, secondary: FakeLM
) -> None:
    # The operator names the chain (NamedLM with fallbacks); a client of the server selects it by name,
    # sees no key, learns which LM answered, and gets the typed error when every LM is down.
    chain = dspex_trio.NamedLM(
        model="openai/first",
        api_base=primary.url,
        api_key="sk-first",
        settings={"num_retries": 0},
        fallbacks=[dspex_trio.NamedLM(model="openai/second", api_base=secondary.url, api_key="sk-second")],
    )
    with trio.fail_after(RUN_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1) as pool, trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(dspex_trio.serve_websocket, pool, "127.0.0.1", 0, lms={"resilient": chain})
            )
            async with dspex_trio.connect(server.url) as remote:
                listed = {item["name"]: item for item in await remote.list_lms()}
                assert [f["model"] for f in listed["resilient"]["fallbacks"]] == ["openai/second"]
                assert "sk-" not in repr(listed)
                await remote.select_lm("resilient")
                pid = await remote.create_program("question -> answer")
                primary.configure(fail_status=500)
                secondary.configure(fail_status=None)
                result = await remote.execute(pid, {"question": "remote"}, with_usage=True)
                assert result["usage"]["lm"] == f"openai/second @ {secondary.url}"
                secondary.configure(fail_status=503)
                with pytest.raises(dspex_trio.AllLMsFailed) as caught:
                    await remote.execute(pid, {"question": "all down"})
            nursery.cancel_scope.cancel()
    assert [t["lm"] for t in caught.value.tried] == [
        f"openai/first @ {primary.url}",
        f"openai/second @ {secondary.url}",
    ]
    assert "sk-first" not in str(caught.value) and "sk-second" not in str(caught.value)


async def test_a_timeout_moves_to_the_next_lm(primary: FakeLM, secondary: FakeLM) -> None:
    # The chain given to open_pool(lm=...) (the pool's default LM from its start).
    chain = {
        **lm(primary, "openai/first", "k1"),
        "timeout": 1.0,
        "fallbacks": [lm(secondary, "openai/second", "k2")],
    }
    with trio.fail_after(RUN_TIMEOUT_S):
        async with dspex_trio.open_pool(workers=1, lm=chain) as pool:
            pid = await pool.create_program("question -> answer")
            primary.configure(latency_s=30.0)
            result = await pool.execute(pid, {"question": "too slow"}, with_usage=True)
    assert result["usage"]["lm"] == f"openai/second @ {secondary.url}"
    [skipped] = result["usage"]["fallbacks"]
    assert skipped["lm"] == f"openai/first @ {primary.url}"
    assert skipped["error"] in ("LMTimeoutError", "LMTransportError")
    assert secondary.statistics.completions == 1
