"""DSPy programs through the real pool, with the embedded offline LM (behaviour compliance)."""

from __future__ import annotations

import os
import signal

import pytest
import trio

import dspex_trio
from tests.helpers import wait_until

COMPLEX = "input: str, context: list[str] -> result: str, reasoning: list[str], confidence: float"


@pytest.fixture
async def pool():
    async with dspex_trio.open_pool(workers=2) as pool:
        yield pool


async def test_create_returns_an_id_and_execute_returns_every_field_typed(pool):
    pid = await pool.create_program("question -> answer", session="s")
    assert isinstance(pid, str) and pid
    out = await pool.execute(pid, {"question": "What is 2 + 2?"}, session="s")
    assert set(out) == {"answer"} and isinstance(out["answer"], str) and out["answer"]


@pytest.mark.parametrize("module", ["predict", "chain_of_thought"])
async def test_complex_signature(pool, module):
    pid = await pool.create_program(COMPLEX, module=module, session="s")
    out = await pool.execute(pid, {"input": "q", "context": ["a", "b"]}, session="s")
    assert isinstance(out["result"], str)
    assert isinstance(out["reasoning"], list) and all(isinstance(x, str) for x in out["reasoning"])
    assert isinstance(out["confidence"], float) and 0.0 <= out["confidence"] <= 1.0
    again = await pool.execute(pid, {"input": "q", "context": ["a", "b"]}, session="s")
    assert again == out  # the offline LM is deterministic


async def test_typed_outputs_and_literals(pool):
    pid = await pool.create_program(
        "text -> n: int, ok: bool, tags: list[str], label: Literal['pos', 'neg']", session="s"
    )
    out = await pool.execute(pid, {"text": "x"}, session="s")
    assert type(out["n"]) is int and type(out["ok"]) is bool
    assert isinstance(out["tags"], list) and out["label"] in ("pos", "neg")


async def test_program_not_found_list_and_delete(pool):
    with pytest.raises(dspex_trio.ProgramNotFound):
        await pool.execute("p_nope", {"question": "x"}, session="s")
    ids = [await pool.create_program("question -> answer", session="s") for _ in range(3)]
    listed = await pool.list_programs(session="s")
    assert len(listed) >= 3 and set(ids) <= {p["id"] for p in listed}
    info = await pool.get_program(ids[0], session="s")
    assert [f["name"] for f in info["outputs"]] == ["answer"]
    await pool.delete_program(ids[0], session="s")
    assert ids[0] not in {p["id"] for p in await pool.list_programs(session="s")}
    with pytest.raises(dspex_trio.ProgramNotFound):
        await pool.execute(ids[0], {"question": "x"}, session="s")


async def test_invalid_signature_is_a_clear_error_at_creation(pool):
    for bad in [
        "a: os.system -> b",
        "a -> b: __import__('os')",
        "a -> a",
        "a: MyClass -> b",
        "a: list[list[str]] -> b",
    ]:
        with pytest.raises(dspex_trio.InvalidParams):
            await pool.create_program(bad, session="s")
    pid = await pool.create_program("question -> answer", session="s")
    with pytest.raises(dspex_trio.InvalidParams):
        await pool.execute(pid, {"wrong": "x"}, session="s")


async def test_sessions_are_isolated(pool):
    pid = await pool.create_program("question -> answer", session="A")
    with pytest.raises(dspex_trio.ProgramNotFound):
        await pool.execute(pid, {"question": "x"}, session="B")
    assert await pool.list_programs(session="B") == []
    await pool.configure_lm("openai/only-for-a", session="A", api_base="http://127.0.0.1:9/v1", api_key="k")
    out = await pool.execute(
        await pool.create_program("question -> answer", session="B"), {"question": "x"}, session="B"
    )
    assert out["answer"]  # B still uses the offline LM


async def test_stream_yields_chunks_then_one_final_event(pool):
    pid = await pool.create_program("question -> answer", module="chain_of_thought", session="s")
    async with pool.stream(pid, {"question": "tell me"}, session="s") as events:
        seen = [event async for event in events]
    chunks = [e for e in seen if e["event"] == "chunk"]
    assert len(chunks) >= 2 and seen[-1]["event"] == "completed"
    assert [e["event"] for e in seen].count("completed") == 1
    assert "".join(c["chunk"] for c in chunks if c["field"] == "answer") == seen[-1]["outputs"]["answer"]


async def test_usage_is_reported(pool):
    pid = await pool.create_program("question -> answer", session="s")
    answer = await pool.execute(pid, {"question": "x"}, session="s", with_usage=True)
    assert answer["usage"]["total_tokens"] > 0


async def test_configure_lm_reaches_every_worker(pool):
    await pool.configure_lm("openai/some-model", api_base="http://127.0.0.1:9/v1", api_key="secret-key")
    reports = [await worker.call("worker_lm") for worker in pool.workers()]
    assert len(reports) == 2
    for report in reports:
        assert report["model"] == "openai/some-model" and report["has_api_key"] is True
        assert "secret-key" not in repr(report)


async def test_programs_survive_worker_death(pool):
    pid = await pool.create_program(COMPLEX, module="chain_of_thought", session="s")
    first = await pool.execute(pid, {"input": "q", "context": []}, session="s")
    for worker in pool.workers():
        os.kill(worker.pid, signal.SIGKILL)
    stats = pool.statistics
    await wait_until(
        lambda: stats().ready == 2 and all(w.state == "ready" for w in stats().workers), timeout=10
    )
    again = await pool.execute(pid, {"input": "q", "context": []}, session="s")
    assert again == first


async def test_state_round_trip(pool):
    pid = await pool.create_program("question -> answer", session="s")
    state = await pool.get_state(pid, session="s")
    state["demos"] = [{"question": "1+1?", "answer": "2"}]
    await pool.load_state(pid, state, session="s")
    assert (await pool.get_state(pid, session="s"))["demos"] == [{"question": "1+1?", "answer": "2"}]


# -- the real HTTP LM path, against the project's fake OpenAI-compatible server ------------------------


@pytest.fixture
async def fake_lm():
    from dspex_trio.testing import open_fake_lm

    async with open_fake_lm() as server:
        yield server


async def configure_fake(pool, fake_lm, session=None):
    await pool.configure_lm(
        "openai/fake", api_base=fake_lm.url, api_key="test-key", num_retries=0, session=session
    )


async def test_chain_of_thought_over_http(pool, fake_lm):
    await configure_fake(pool, fake_lm)
    pid = await pool.create_program("question -> answer, confidence: float", module="chain_of_thought")
    out = await pool.execute(pid, {"question": "Why is the sky blue?"})
    assert isinstance(out["answer"], str) and out["answer"]
    assert isinstance(out["reasoning"], str) and isinstance(out["confidence"], float)
    assert fake_lm.requests >= 1


async def test_streaming_over_http_yields_chunks_before_the_final_event(pool, fake_lm):
    await configure_fake(pool, fake_lm)
    pid = await pool.create_program("question -> answer")
    async with pool.stream(pid, {"question": "Tell me a story"}) as events:
        seen = [event async for event in events]
    assert sum(1 for e in seen if e["event"] == "chunk") >= 2
    assert seen[-1]["event"] == "completed" and seen[-1]["outputs"]["answer"]


async def test_rate_limit_is_a_program_error_naming_the_dspy_type(pool, fake_lm):
    await configure_fake(pool, fake_lm)
    pid = await pool.create_program("question -> answer")
    fake_lm.configure(fail_status=429, fail_count=100)
    with pytest.raises(dspex_trio.ProgramError) as caught:
        await pool.execute(pid, {"question": "x"})
    assert caught.value.error_type == "LMRateLimitError"
    assert "test-key" not in str(caught.value)


async def test_an_lm_without_a_key_says_where_a_key_goes(pool, fake_lm):
    await pool.configure_lm("openai/fake", session="nokey", api_base=fake_lm.url)
    program = await pool.create_program("question -> answer", session="nokey")
    with pytest.raises(dspex_trio.ProgramError) as info:
        await pool.execute(program, {"question": "q"}, session="nokey")
    assert info.value.error_type == "LMNotConfiguredError"
    message = str(info.value)
    assert "dspy.LM(" not in message  # what a CLI or websocket user cannot do
    assert all(hint in message for hint in ("api_key=", "--lm-api-key-file", "lm/configure", "lm/select"))
    assert fake_lm.requests == 0  # nothing was sent without a key


async def test_session_lm_is_invisible_to_other_sessions(pool, fake_lm):
    await configure_fake(pool, fake_lm, session="A")
    a = await pool.create_program("question -> answer", session="A")
    b = await pool.create_program("question -> answer", session="B")
    await pool.execute(b, {"question": "x"}, session="B")
    assert fake_lm.requests == 0  # B runs on the offline LM
    await pool.execute(a, {"question": "x"}, session="A")
    assert fake_lm.requests >= 1


async def test_a_worker_killed_mid_execution_loses_no_program(pool, fake_lm):
    await configure_fake(pool, fake_lm)
    pid = await pool.create_program("question -> answer")
    fake_lm.configure(latency_s=30.0)
    outcome: list[BaseException] = []

    async def execute() -> None:
        try:
            await pool.execute(pid, {"question": "slow"})
        except dspex_trio.WorkerCrashed as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(execute)
        await wait_until(lambda: fake_lm.requests >= 1, timeout=10)
        busy = [w for w in pool.statistics().workers if w.in_flight]
        assert len(busy) == 1
        os.kill(busy[0].pid, signal.SIGKILL)
    assert len(outcome) == 1 and outcome[0].started is True  # it was running: not retried silently
    fake_lm.configure(latency_s=0.0)
    assert pid in {p["id"] for p in await pool.list_programs()}
    out = await pool.execute(pid, {"question": "again"})
    assert out["answer"]
    assert busy[0].pid not in {w.pid for w in pool.statistics().workers}
