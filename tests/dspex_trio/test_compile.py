"""Compile jobs on the real pool (real workers, real DSPy, the offline LM): the same demos as DSPy's own
optimizers run in-process on the same program, metric, data and seeds (``BootstrapFewShot``, and
``BootstrapFewShotWithRandomSearch`` with the same candidate scores), a new program holding the state,
cancellation, and bad input refused before anything runs. Real processes mean real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import dspy
import pytest
import trio

import dspex_trio
from bridge_child._offline_lm import offline_lm
from tests import jobs_module
from tests.dspex_trio.test_jobs import devset

APP = "tests.jobs_module"


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with dspex_trio.open_pool(workers=2, programs=[APP]) as pool:
        yield pool


def examples(data: list[dict[str, Any]]) -> list[dspy.Example]:
    return [dspy.Example(**e["inputs"], **e["labels"]).with_inputs(*e["inputs"]) for e in data]


def in_process(optimizer: Any, module: dspy.Module, **kwargs: Any) -> dspy.Module:
    with dspy.context(lm=offline_lm(), adapter=dspy.ChatAdapter()):
        return optimizer.compile(module, **kwargs)


def demos_of(state: dict[str, Any]) -> dict[str, Any]:
    if "demos" in state:
        return {"self": state["demos"]}
    return {name: value["demos"] for name, value in state.items() if name != "metadata"}


@pytest.mark.parametrize(("program", "factory"), [("qa", jobs_module.qa), ("two_step", jobs_module.TwoStep)])
async def test_bootstrap_few_shot_gives_dspy_s_demos(
    pool: dspex_trio.Pool, program: str, factory: Any
) -> None:
    trainset = devset(24)
    options = {"max_bootstrapped_demos": 3, "max_labeled_demos": 6}
    pid = await pool.create_program(module=program)
    seen = []
    async with pool.compile(
        pid, optimizer="bootstrap_few_shot", trainset=trainset, metric="agrees", options=options
    ) as job:
        async for progress in job:
            seen.append(progress)
    result = job.result
    theirs = in_process(
        dspy.BootstrapFewShot(metric=jobs_module.agrees, **options), factory(), trainset=examples(trainset)
    ).dump_state()
    ours = demos_of(result.state)
    assert ours == demos_of(theirs)
    assert sum(1 for demos in ours.values() for d in demos if d.get("augmented")) >= len(ours)
    assert seen[-1].bootstrapped >= 1
    # a new program, holding the state; the student is unchanged, the teacher is gone
    assert result.program != pid
    assert demos_of(await pool.get_state(result.program)) == ours
    assert all(not d for d in demos_of(await pool.get_state(pid)).values())
    assert {p["id"] for p in await pool.list_programs()} == {pid, result.program}


async def test_random_search_gives_dspy_s_candidates_and_best_program(pool: dspex_trio.Pool) -> None:
    trainset, valset = devset(20), devset(30)[20:]
    options = {"max_bootstrapped_demos": 3, "max_labeled_demos": 4, "num_candidate_programs": 2}
    pid = await pool.create_program(module="qa")
    async with pool.compile(
        pid,
        optimizer="bootstrap_few_shot_with_random_search",
        trainset=trainset,
        valset=valset,
        metric="agrees",
        options=options,
    ) as job:
        trials = [p.trials async for p in job]
    result = job.result
    theirs = in_process(
        dspy.BootstrapFewShotWithRandomSearch(metric=jobs_module.agrees, num_threads=4, **options),
        jobs_module.qa(),
        trainset=examples(trainset),
        valset=examples(valset),
    )
    expected = {c["seed"]: c["score"] for c in theirs.candidate_programs}
    assert {c["seed"]: c["score"] for c in result.candidates} == expected
    assert result.score == max(expected.values())
    assert demos_of(result.state) == demos_of(theirs.dump_state())
    assert trials[-1] == 5


async def test_cancelling_a_compile_job_leaves_no_program_behind(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="slow")
    with trio.move_on_after(30):  # a bound, never reached
        async with pool.compile(
            pid,
            optimizer="bootstrap_few_shot_with_random_search",
            trainset=devset(10),
            metric="agrees",
            options={"num_candidate_programs": 4},
        ) as job:
            async for progress in job:
                if progress.trials >= 1:
                    break
    assert progress.stage == "search" and progress.total_trials == 7
    with pytest.raises(dspex_trio.JobCancelled):
        job.result  # noqa: B018
    assert [p["id"] for p in await pool.list_programs()] == [pid]


async def test_bad_compile_input_is_refused_before_anything_runs(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="qa")
    train = devset(4)

    async def refused(match: str, **kwargs: Any) -> None:
        arguments = {"optimizer": "bootstrap_few_shot", "trainset": train, "metric": "agrees"} | kwargs
        with pytest.raises(dspex_trio.InvalidParams, match=match):
            async with pool.compile(pid, **arguments):
                pass

    await refused("unknown optimizer 'copro'", optimizer="copro")
    await refused("gepa needs exactly one of auto", optimizer="gepa")
    await refused("unknown option", options={"max_demos": 3})
    await refused(r"max_bootstrapped_demos must be an integer", options={"max_bootstrapped_demos": -1})
    await refused("empty trainset", trainset=[])
    await refused("unknown metric 'nope'", metric="nope")
    await refused(r"trainset\[0\] is missing input field", trainset=[{"inputs": {}, "labels": {}}])
    await refused("takes no valset", valset=train)
    assert [p["id"] for p in await pool.list_programs()] == [pid]
