"""Program modules served by the real pool (real workers, real DSPy): the test application
(``tests/program_module.py``) through the fake LM over HTTP, its state to and from plain DSPy, bad
programs refused at creation while the pool serves others, tools bounded by the execution's deadline,
programs that outlive their worker, and start-up refusing a module that cannot be used.

(The same behaviour on every layer: test_compliance.py; in-process: tests/bridge_child/test_builtins.py.)
Real processes mean real time: bounded waits only, no timing asserted.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import dspex_trio
from dspex_trio.testing import FakeLM, FakeLMConfig
from tests.helpers import wait_until
from tests.recording_lm import ANSWER, recording_lm

APP = "tests.program_module"


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with dspex_trio.open_pool(workers=2, programs=[APP]) as pool:
        yield pool


async def use_fake_lm(pool: dspex_trio.Pool, fake: FakeLM, session: str) -> None:
    await pool.configure_lm(
        "openai/fake", api_base=fake.url, api_key="test-key", num_retries=0, session=session
    )


PROGRAMS = [
    ({"module": "rag"}, {"question": "What is Trio?"}),
    ({"module": "two_hop"}, {"question": "What does a zygote share?"}),
    ({"module": "agent"}, {"question": "How long is this?"}),
    ({"module": "judge"}, {"text": "What a lovely day."}),
    ({"module": "chat"}, {"history": [{"question": "Hi?", "answer": "Hello."}], "question": "And then?"}),
    ({"module": "pipeline"}, {"text": "Trio nurseries and cancel scopes."}),
    (
        {
            "signature": "question -> answer",
            "module": "react",
            "tools": ["lookup", "word_count"],
            "max_iters": 2,
        },
        {"question": "What is DSPy?"},
    ),
    ({"module": "best_of_n", "base": "rag", "reward": "short_answer", "n": 2}, {"question": "What is Trio?"}),
    (
        {"signature": "question -> answer", "module": "refine", "reward": "short_answer", "n": 2},
        {"question": "What is Trio?"},
    ),
    ({"signature": "question -> answer", "module": "multi_chain_comparison", "n": 2}, {"question": "Why?"}),
]
"""Every program of the test application, and the built-ins over its tools and metrics."""


@pytest.mark.parametrize("lm", ["offline", "fake-lm over HTTP"])
async def test_every_program_runs_streamed_and_not(
    pool: dspex_trio.Pool, dspex_fake_lm: FakeLM, lm: str
) -> None:
    if lm != "offline":
        await use_fake_lm(pool, dspex_fake_lm, "s")
    for kwargs, inputs in PROGRAMS:
        pid = await pool.create_program(session="s", **kwargs)
        declared = [f["name"] for f in (await pool.get_program(pid, session="s"))["outputs"]]
        answer = await pool.execute(pid, inputs, session="s", with_usage=True)
        assert list(answer["outputs"]) == declared, kwargs
        assert answer["usage"]["total_tokens"] > 0
        async with pool.stream(pid, inputs, session="s") as events:
            seen = [event async for event in events]
        assert seen[-1]["event"] == "completed" and list(seen[-1]["outputs"]) == declared
        assert any(e["event"] == "status" and e["status"] == "predictor" for e in seen), kwargs
    if lm != "offline":
        assert dspex_fake_lm.requests >= 2 * len(PROGRAMS)  # every program really called it


async def test_a_program_optimized_in_dspy_loads_on_the_pool_and_back(
    pool: dspex_trio.Pool, dspex_fake_lm: FakeLM, tmp_path: Path
) -> None:
    """BootstrapFewShot compiled in-process against the fake LM and save()d: loaded on the pool its demos
    reach the prompt the LM receives; get_state from the pool load()s into plain DSPy, same outputs."""
    import dspy

    from tests.program_module import RAG

    lm = dspy.LM("openai/fake", api_base=dspex_fake_lm.url, api_key="test-key", cache=False, num_retries=0)
    questions = ["What is Trio?", "What is a nursery?", "What is DSPy?", "What is a zygote?"]

    def compile_in_dspy(program: Any, path: Path) -> None:
        trainset = [dspy.Example(question=q, answer="unused").with_inputs("question") for q in questions]
        optimizer = dspy.BootstrapFewShot(
            metric=lambda example, prediction, trace=None: True, max_bootstrapped_demos=2, max_labeled_demos=0
        )
        with dspy.context(lm=lm):
            optimizer.compile(program, trainset=trainset).save(str(path))

    # a plain Predict, and the registered RAG (a module with a ChainOfThought inside)
    predict_path, rag_path = tmp_path / "predict.json", tmp_path / "rag.json"
    await trio.to_thread.run_sync(compile_in_dspy, dspy.Predict("question -> answer"), predict_path)
    await trio.to_thread.run_sync(compile_in_dspy, RAG(), rag_path)
    saved = json.loads(predict_path.read_text())
    assert len(saved["demos"]) == 2 and "metadata" in saved

    with recording_lm() as recorder:
        await pool.configure_lm(
            "openai/recorder", api_base=recorder.url, api_key="k", num_retries=0, session="r"
        )
        pid = await pool.create_program("question -> answer", state=saved, session="r")
        assert await pool.execute(pid, {"question": "And what is new?"}, session="r") == {"answer": ANSWER}
        sent = recorder.everything_sent()
    for demo in saved["demos"]:  # the demos are in the prompt, as DSPy formats them
        assert json.dumps(demo["question"])[1:-1] in sent and json.dumps(demo["answer"])[1:-1] in sent

    await use_fake_lm(pool, dspex_fake_lm, "f")
    rag_saved = json.loads(rag_path.read_text())
    assert len(rag_saved["respond.predict"]["demos"]) == 2
    rag = await pool.create_program(module="rag", state=rag_saved, session="f")
    for program, path, fresh in ((rag, tmp_path / "back.json", RAG()),):
        path.write_text(json.dumps(await pool.get_state(program, session="f")))

        def run_in_dspy(fresh: Any = fresh, path: Path = path) -> Any:
            fresh.load(str(path))  # DSPy's own loader
            with dspy.context(lm=lm):
                return fresh(question="What is new?").toDict()

        in_dspy = await trio.to_thread.run_sync(run_in_dspy)
        on_pool = await pool.execute(program, {"question": "What is new?"}, session="f")
        assert on_pool == {k: in_dspy[k] for k in on_pool}
        assert fresh.respond.predict.demos and len(fresh.respond.predict.demos) == 2


async def test_bad_programs_fail_at_creation_while_the_pool_serves_others(pool: dspex_trio.Pool) -> None:
    good = await pool.create_program(module="pipeline", session="good")
    expected = await pool.execute(good, {"text": "t"}, session="good")
    served = 0
    done = trio.Event()

    async def keep_serving() -> None:
        nonlocal served
        while not done.is_set():
            assert await pool.execute(good, {"text": "t"}, session="good") == expected
            served += 1

    fifty_mb = {"respond.predict": {"demos": [{"question": "x" * 1_000_000} for _ in range(50)]}}
    other = await pool.get_state(good, session="good")  # the pipeline's predictors, not rag's
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"module": "nope"}, dspex_trio.InvalidParams, "unknown module 'nope'; built-in modules: predict"),
        (
            {"module": "broken"},
            dspex_trio.ProgramError,
            "the factory of program 'broken' raised RuntimeError",
        ),
        (
            {"signature": "q -> a", "module": "react", "tools": ["format_disk"]},
            dspex_trio.InvalidParams,
            "react: unknown tool 'format_disk'",
        ),
        ({"module": "rag", "state": other}, dspex_trio.InvalidParams, "names predictor 'summarize'"),
        (
            {
                "module": "rag",
                "state": {"respond.predict": {"py/reduce": [{"py/type": "os.system"}, ["ls"]]}},
            },
            dspex_trio.InvalidParams,
            "unknown key(s) 'py/reduce'",
        ),
        (
            {"module": "rag", "state": {"respond.predict": {"demos": [{"q": b"\x80\x04\x95"}]}}},
            dspex_trio.InvalidParams,
            "holds a bytes; a state is plain JSON data",
        ),
        ({"module": "rag", "state": fifty_mb}, dspex_trio.InvalidParams, "bytes of JSON; at most 8388608"),
    ]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_serving)
        for kwargs, error, message in bad:
            with pytest.raises(error) as info:
                await pool.create_program(session="bad", **kwargs)
            assert message in str(info.value), (kwargs, str(info.value))
        await wait_until(lambda: served >= 3, 30, "executions of the good program meanwhile")
        done.set()
    assert await pool.list_programs(session="bad") == []


async def test_a_hanging_tool_is_bounded_by_the_execution_deadline(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program("question -> answer", module="react", tools=["stall"], max_iters=1)
    with pytest.raises(dspex_trio.CallTimeout):
        await pool.execute(pid, {"question": "q"}, timeout=1.0)  # the tool hangs for an hour
    # the program thread was freed (the tool's own thread is abandoned), and the pool serves on
    for worker in pool.statistics().workers:
        await wait_until(
            lambda w=worker: _executing(pool, w.worker_id), 30, "the stopped execution leaves its worker"
        )
    rag = await pool.create_program(module="rag")
    assert (await pool.execute(rag, {"question": "What is Trio?"}))["answer"]


def _executing(pool: dspex_trio.Pool, worker_id: str) -> Any:
    async def check() -> bool:
        worker = next(w for w in pool.workers() if w.worker_id == worker_id)
        return (await worker.call("stats"))["executing"] == []

    return check()


async def test_a_tool_writing_to_stdout_leaves_the_frame_stream_intact(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(
        "question -> answer", module="react", tools=["noisy"], max_iters=3, include=["trajectory"]
    )
    called = 0
    for i in range(8):  # the offline LM picks the tool by the question: some call it
        outputs = await pool.execute(pid, {"question": f"Question number {i}?"})
        called += list(outputs["trajectory"].values()).count("printed")
        assert isinstance(outputs["answer"], str)
    assert called > 0
    assert pool.statistics().restarts == 0  # no worker was lost to a corrupt frame


async def test_a_program_and_its_state_outlive_a_killed_worker(
    pool: dspex_trio.Pool, dspex_fake_lm: FakeLM
) -> None:
    await use_fake_lm(pool, dspex_fake_lm, "k")
    pid = await pool.create_program(module="rag", session="k")
    state = await pool.get_state(pid, session="k")
    state["respond.predict"]["signature"]["instructions"] = "Answer from the context only."
    await pool.load_state(pid, state, session="k")
    dspex_fake_lm.config = FakeLMConfig(latency_s=30.0)  # every execution now waits in its worker

    async def doomed() -> None:
        with pytest.raises(dspex_trio.WorkerCrashed):
            await pool.execute(pid, {"question": "What is Trio?"}, session="k")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(doomed)
        await wait_until(lambda: any(w.in_flight for w in pool.statistics().workers), 30, "in flight")
        victim = next(w for w in pool.statistics().workers if w.in_flight)
        os.kill(victim.pid, signal.SIGKILL)
    dspex_fake_lm.config = FakeLMConfig()
    outputs = await pool.execute(pid, {"question": "What is Trio?"}, session="k")  # on another worker
    assert set(outputs) == {"reasoning", "answer"}
    assert (await pool.get_state(pid, session="k"))["respond.predict"]["signature"]["instructions"] == (
        "Answer from the context only."
    )
    assert victim.pid not in {w.pid for w in pool.statistics().workers}


# -- start-up -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["zygote", "subprocess"])
@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("tests.bad_programs.import_error", "cannot import it: ModuleNotFoundError"),
        ("tests.bad_programs.not_a_dict", "PROGRAMS must be a dict of name -> callable, not list"),
        ("tests.bad_programs.shadows_builtin", "has the name of the built-in module 'chain_of_thought'"),
    ],
)
async def test_a_module_that_cannot_be_used_stops_the_pool_with_one_error(
    launcher: str, module: str, message: str
) -> None:
    with pytest.raises(dspex_trio.ProgramModuleError) as info:
        async with dspex_trio.open_pool(workers=2, programs=[module], launcher=launcher):
            pytest.fail("the pool started")
    assert str(info.value).startswith(f"program module {module!r}: ") and message in str(info.value)


async def test_the_zygote_refuses_a_module_that_starts_a_thread() -> None:
    module = "tests.bad_programs.starts_thread"
    with pytest.raises(dspex_trio.ProgramModuleError, match="importing it started a thread"):
        async with dspex_trio.open_pool(workers=1, programs=[module], launcher="zygote"):
            pytest.fail("the pool started")
    async with dspex_trio.open_pool(workers=1, programs=[module], launcher="subprocess") as pool:
        assert [t["name"] for t in (await pool.available_programs())["tools"]] == ["noop"]


@pytest.mark.parametrize("kind", ["mock", "bridge", "fallback"])
async def test_every_backend_refuses_a_module_that_cannot_be_used(kind: str) -> None:
    options: dict[str, Any] = {"programs": ["tests.bad_programs.nothing"]}
    with pytest.raises(dspex_trio.ProgramModuleError, match="defines none of PROGRAMS, TOOLS, METRICS"):
        async with dspex_trio.open_backend(kind, **options):  # type: ignore[arg-type]
            pytest.fail("the backend started")


async def test_a_remote_client_creates_registered_programs_and_streams_their_status() -> None:
    async with dspex_trio.open_backend("mock", programs=[APP]) as mock, trio.open_nursery() as nursery:
        server = await nursery.start(dspex_trio.serve_websocket, mock, "127.0.0.1", 0)
        async with dspex_trio.connect(server.url) as remote:
            assert {"rag", "agent"} <= {p["name"] for p in (await remote.available_programs())["programs"]}
            react = await remote.create_program(
                "question -> answer", module="react", tools=["lookup"], include=["trajectory"]
            )
            assert list(await remote.execute(react, {"question": "q"})) == [
                "reasoning",
                "answer",
                "trajectory",
            ]
            rag = await remote.create_program(module="rag")
            async with remote.stream(rag, {"question": "What is Trio?"}) as events:
                seen = [event async for event in events]
            assert seen[0] == {
                "event": "status",
                "status": "predictor",
                "predictor": "respond.predict",
                "message": "respond.predict started",
            }
            assert {e["predictor"] for e in seen if e["event"] == "chunk"} == {"respond.predict"}
            with pytest.raises(dspex_trio.InvalidParams, match="unknown module 'rga'"):
                await remote.create_program(module="rga")
        nursery.cancel_scope.cancel()
