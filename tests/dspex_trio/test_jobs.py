"""Evaluation jobs on the real pool (real workers, real DSPy, the offline LM): the same score and
per-example scores as ``dspy.Evaluate`` in-process, DSPy's counting of failed examples and
``max_errors``, every example scored exactly once while workers are SIGKILLed, cancellation that
stops every execution of the job while the pool serves others, and bad input refused before anything
runs. Real processes mean real time: bounded waits only, no timing asserted.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import dspy
import pytest
import trio

import dspex_trio
from bridge_child._offline_lm import offline_lm
from dspex_trio._jobs import EvaluationResult, JobProgress
from tests import jobs_module
from tests.helpers import wait_until

APP = "tests.jobs_module"
LIVE = (dspex_trio.WorkerState.READY, dspex_trio.WorkerState.BUSY)


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with dspex_trio.open_pool(workers=2, programs=[APP]) as pool:
        yield pool


def devset(n: int, *, boom: tuple[int, ...] = (), raises: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """``n`` examples; the questions at ``boom`` make ``fragile`` raise, the labels at ``raises`` make
    ``picky`` raise."""
    return [
        {
            "inputs": {"question": f"question {i} {'boom' if i in boom else ''}".strip() + "?"},
            "labels": {"answer": "raise" if i in raises else f"the answer is {i}"},
        }
        for i in range(n)
    ]


def dspy_evaluate(module: dspy.Module, examples: list[dict[str, Any]], metric: Any, **kwargs: Any) -> Any:
    """``dspy.Evaluate`` in this process, with the offline LM the workers use, on the same data."""
    dataset = [dspy.Example(**e["inputs"], **e["labels"]).with_inputs(*e["inputs"]) for e in examples]
    with dspy.context(lm=offline_lm(), adapter=dspy.ChatAdapter()):
        return dspy.Evaluate(devset=dataset, metric=metric, num_threads=4, **kwargs)(module)


async def evaluate(pool: dspex_trio.Pool, pid: str, examples: Any, **kwargs: Any) -> EvaluationResult:
    async with pool.evaluate(pid, examples, **kwargs) as job:
        seen: list[JobProgress] = [p async for p in job]
    assert seen[-1].done == seen[-1].total == len(examples)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    return job.result


@pytest.mark.parametrize(
    ("program", "metric", "examples", "factory", "metric_fn"),
    [
        ("qa", "agrees", devset(60), jobs_module.qa, jobs_module.agrees),
        ("qa", "overlap", devset(60), jobs_module.qa, jobs_module.overlap),
        ("fragile", "agrees", devset(40, boom=(3, 17, 29)), jobs_module.Fragile, jobs_module.agrees),
        ("qa", "picky", devset(40, raises=(5, 6)), jobs_module.qa, jobs_module.picky),
    ],
    ids=["bool metric", "float metric", "program raising", "metric raising"],
)
async def test_the_same_score_and_per_example_scores_as_dspy_evaluate(
    pool: dspex_trio.Pool, program: str, metric: str, examples: Any, factory: Any, metric_fn: Any
) -> None:
    pid = await pool.create_program(module=program)
    ours = await evaluate(pool, pid, examples, metric=metric)
    theirs = dspy_evaluate(factory(), examples, metric_fn)
    assert ours.score == theirs.score
    assert [r.score for r in ours.results] == [score for _, _, score in theirs.results]
    failed = [r.index for r in ours.results if r.error is not None]
    assert ours.errors == len(failed)
    assert failed == [i for i, (_, prediction, _) in enumerate(theirs.results) if not prediction.keys()]
    for r in ours.results:
        if r.error is None:
            assert set(r.outputs or {}) == {"answer", "correct"}
        else:
            assert r.outputs is None and r.score == 0.0
            assert r.error["stage"] == ("metric" if metric == "picky" else "program")
            assert r.error["type"] == ("RuntimeError" if metric == "picky" else "ValueError")


async def test_max_errors_stops_the_job_as_dspy_stops(pool: dspex_trio.Pool) -> None:
    examples = devset(30, boom=(2, 4, 6))
    pid = await pool.create_program(module="fragile")
    with pytest.raises(Exception, match="cancelled due to errors"):
        dspy_evaluate(jobs_module.Fragile(), examples, jobs_module.agrees, max_errors=3)
    with pytest.raises(dspex_trio.JobFailed, match="3 examples failed") as caught:
        async with pool.evaluate(pid, examples, metric="agrees", max_errors=3) as job:
            await job.wait()
    assert sum(r.error is not None for r in caught.value.results) == 3
    # one error fewer than the limit: the job completes, as DSPy's does
    result = await evaluate(pool, pid, examples, metric="agrees", max_errors=4)
    assert result.errors == 3
    assert (
        result.score == dspy_evaluate(jobs_module.Fragile(), examples, jobs_module.agrees, max_errors=4).score
    )


async def test_a_worker_sigkilled_every_200_ms_loses_nothing_and_counts_nothing_twice() -> None:
    examples = devset(2000)
    options = dspex_trio.PoolOptions(workers=2, restart_intensity=1000, min_healthy_uptime=0.0)
    async with dspex_trio.open_pool(options=options, programs=[APP]) as pool:
        pid = await pool.create_program(module="qa")
        reference = await evaluate(pool, pid, examples[:200], metric="agrees")
        kills: list[int] = []
        async with (
            pool.evaluate(pid, examples, metric="agrees", concurrency=32) as job,
            trio.open_nursery() as nursery,
        ):

            async def killer() -> None:
                while not job.finished:
                    await trio.sleep(0.2)
                    ready = [w for w in pool.workers() if w.state in LIVE]
                    if ready and not job.finished:
                        os.kill(ready[0].pid, signal.SIGKILL)
                        kills.append(ready[0].pid)

            nursery.start_soon(killer)
            result = await job.wait()
        stats = pool.statistics()
    assert len(kills) >= 2, "the job outlived at least two kills"
    assert stats.retried + stats.redispatched > 0, "examples whose worker died were sent again"
    assert [r.index for r in result.results] == list(range(len(examples)))
    assert result.errors == 0
    assert [r.score for r in result.results[:200]] == [r.score for r in reference.results]
    theirs = dspy_evaluate(jobs_module.qa(), examples, jobs_module.agrees)
    assert result.score == theirs.score


async def test_cancelling_a_job_stops_its_executions_and_the_pool_serves_others(
    pool: dspex_trio.Pool,
) -> None:
    slow = await pool.create_program(module="slow")
    qa = await pool.create_program(module="qa")
    served = 0
    with trio.move_on_after(30):  # a bound, never reached
        async with pool.evaluate(slow, devset(500), metric="agrees", concurrency=4) as job:
            async for progress in job:
                await pool.execute(qa, {"question": "still there?"})
                served += 1
                if progress.done >= 6:
                    break
    assert served >= 2, "other callers were served while the job ran"
    with pytest.raises(dspex_trio.JobCancelled):
        job.result  # noqa: B018
    assert job.progress.done < 500

    async def idle() -> bool:
        stats = [await w.call("stats") for w in pool.workers()]
        return all(not s["executing"] and not s["pending"] for s in stats)

    await wait_until(idle, timeout=1.0 + jobs_module.SLOW_S, message="the job's executions stopped")
    await trio.sleep(1.0)
    assert await idle(), "nothing of the job runs 1 s later"
    assert (await pool.execute(qa, {"question": "after?"}))["answer"]


async def test_bad_input_is_refused_before_anything_runs(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="qa")
    with pytest.raises(dspex_trio.InvalidParams, match="unknown metric 'nope'; registered metrics: agrees"):
        async with pool.evaluate(pid, devset(3), metric="nope"):
            pass
    with pytest.raises(dspex_trio.InvalidParams, match="empty devset"):
        async with pool.evaluate(pid, [], metric="agrees"):
            pass
    missing = [*devset(3), {"inputs": {"query": "typo"}, "labels": {}}]
    with pytest.raises(dspex_trio.InvalidParams, match=r"devset\[3\] is missing input field\(s\) 'question'"):
        async with pool.evaluate(pid, missing, metric="agrees"):
            pass
    typed = [{"inputs": {"question": 5}, "labels": {}}]
    with pytest.raises(dspex_trio.InvalidParams, match=r"devset\[0\]: input 'question' must be str, not int"):
        async with pool.evaluate(pid, typed, metric="agrees"):
            pass
    with pytest.raises(dspex_trio.InvalidParams, match=r"devset\[0\] must be"):
        async with pool.evaluate(pid, ["not an example"], metric="agrees"):
            pass
    with pytest.raises(dspex_trio.ProgramNotFound):
        async with pool.evaluate("p_nope", devset(3), metric="agrees"):
            pass
    with pytest.raises(dspex_trio.InvalidParams, match="max_errors"):
        async with pool.evaluate(pid, devset(3), metric="agrees", max_errors=0):
            pass
    stats = pool.statistics()
    assert not any(m == "score_examples" for m in stats.latency), "no example was sent"


async def test_the_bridge_evaluates_and_compiles_as_the_pool_does(pool: dspex_trio.Pool) -> None:
    examples = devset(30, boom=(4,))
    pid = await pool.create_program(module="fragile")
    expected = await evaluate(pool, pid, examples, metric="agrees")
    async with dspex_trio.open_backend("bridge", programs=[APP]) as bridge:
        bid = await bridge.create_program(module="fragile")
        async with bridge.evaluate(bid, examples, metric="agrees") as job:  # type: ignore[attr-defined]
            result = await job.wait()
        async with (
            bridge.compile(  # type: ignore[attr-defined]
                bid, optimizer="bootstrap_few_shot", trainset=examples[:10], metric="agrees"
            ) as job
        ):
            compiled = await job.wait()
    assert result.score == expected.score and result.errors == 1
    assert [r.score for r in result.results] == [r.score for r in expected.results]
    assert compiled.state["respond"]["demos"], "the bridge bootstrapped demos"
