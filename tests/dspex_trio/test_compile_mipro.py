"""``pool.compile(..., optimizer="mipro_v2")`` on the real pool (real workers, real DSPy, the offline LM):
the same trials (parameters and scores), the same best score and the same optimized state as
``dspy.MIPROv2`` run in-process on the same program, metric, data and seed; a worker SIGKILLed during
the trials changes nothing; cancelling leaves no program behind; bad options are refused before
anything runs. Real processes mean real time: bounded waits only, no timing asserted.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import AsyncIterator
from typing import Any

import dspy
import pytest
import trio

import dspex_trio
from bridge_child._offline_lm import offline_lm
from dspex_trio.testing import open_fake_lm
from tests import jobs_module
from tests.dspex_trio.test_jobs import devset
from tests.helpers import wait_until

APP = "tests.jobs_module"
LIVE = (dspex_trio.WorkerState.READY, dspex_trio.WorkerState.BUSY)
OPTIONS: dict[str, Any] = {
    "auto": None,
    "num_candidates": 4,
    "num_trials": 6,
    "max_bootstrapped_demos": 2,
    "max_labeled_demos": 2,
    "minibatch_size": 5,
    "minibatch_full_eval_steps": 2,
    "seed": 0,  # with this seed a proposed instruction and a demo set beat the student (checked below)
}
TRAIN, VAL = devset(20), devset(32)[20:]
COMPILE_ARGS = ("num_trials", "minibatch", "minibatch_size", "minibatch_full_eval_steps")
"""The options that are arguments of ``MIPROv2.compile`` (the others are its constructor's)."""


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with dspex_trio.open_pool(workers=2, programs=[APP]) as pool:
        yield pool


def examples(data: list[dict[str, Any]]) -> list[dspy.Example]:
    return [dspy.Example(**e["inputs"], **e["labels"]).with_inputs(*e["inputs"]) for e in data]


def dspy_mipro(
    options: dict[str, Any],
    factory: Any = jobs_module.Tuned,
    *,
    metric: Any = jobs_module.agrees,
    data: tuple[list[dict[str, Any]], list[dict[str, Any]]] = (TRAIN, VAL),
    **extra: Any,
) -> dspy.Module:
    """``dspy.MIPROv2`` in this process, with the offline LM the workers use."""
    constructor = {k: v for k, v in options.items() if k not in COMPILE_ARGS}
    with warnings.catch_warnings(), dspy.context(lm=offline_lm(), adapter=dspy.ChatAdapter()):
        warnings.simplefilter("ignore")
        optimizer = dspy.MIPROv2(metric=metric, num_threads=4, **constructor, **extra)
        return optimizer.compile(
            factory(),
            trainset=examples(data[0]),
            valset=examples(data[1]),
            **{k: options[k] for k in COMPILE_ARGS if k in options},
        )


def dspy_trials(best: dspy.Module) -> list[tuple[int, float, dict[str, Any] | None]]:
    """DSPy's trial logs as ours: (trial, score, the minibatch trials' parameters)."""
    trials = []
    for number, log in best.trial_logs.items():
        if "mb_score" in log:
            params = {k: v for k, v in log.items() if k.endswith(("_instruction", "_demos"))}
            trials.append((number, log["mb_score"], params))
        else:
            trials.append((number, log["full_eval_score"], None))
    return trials


def our_trials(result: Any) -> list[tuple[int, float, dict[str, Any] | None]]:
    return [(c["trial"], c["score"], None if c["full_eval"] else c["params"]) for c in result.candidates]


def without_metadata(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "metadata"}


async def test_mipro_v2_gives_dspy_s_trials_and_optimized_program(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="tuned")
    seen: list[Any] = []
    async with pool.compile(
        pid, optimizer="mipro_v2", trainset=TRAIN, valset=VAL, metric="agrees", options=OPTIONS
    ) as job:
        async for progress in job:
            seen.append(progress)
    result = job.result
    theirs = dspy_mipro(OPTIONS)
    assert our_trials(result) == dspy_trials(theirs)
    assert result.score == theirs.score
    assert without_metadata(result.state) == theirs.dump_state()
    student = await pool.get_state(pid)
    assert without_metadata(result.state) != without_metadata(student), "a candidate beat the student"
    # the chosen program's score is its full evaluation on the valset, on the pool as in DSPy
    async with pool.evaluate(result.program, VAL, metric="agrees") as evaluation:
        assert (await evaluation.wait()).score == result.score
    # progress: every stage, then one event per trial with its score and the best so far
    assert [s for i, s in enumerate(p.stage for p in seen) if i == 0 or seen[i - 1].stage != s] == [
        "bootstrap",
        "propose",
        "search",
    ]
    last = seen[-1]
    assert (last.trials, last.total_trials, last.best_score) == (len(result.candidates), 10, result.score)
    assert {p["id"] for p in await pool.list_programs()} == {pid, result.program}


@pytest.mark.parametrize(
    ("program", "factory", "options"),
    [
        # DSPy's defaults (auto "light": a valset this small is evaluated whole, 20 trials), 2 predictors
        ("two_step", jobs_module.TwoStep, {"seed": 0}),
        # zero-shot: demo sets only inform the proposals, the search is over instructions
        (
            "tuned",
            jobs_module.Tuned,
            {**OPTIONS, "max_bootstrapped_demos": 0, "max_labeled_demos": 0, "seed": 3},
        ),
        # no minibatches: every trial a full evaluation
        (
            "tuned",
            jobs_module.Tuned,
            {**OPTIONS, "minibatch": False, "num_trials": 4, "max_labeled_demos": 1},
        ),
    ],
    ids=["auto_light_two_predictors", "zero_shot", "no_minibatch"],
)
async def test_mipro_v2_follows_dspy_in_its_other_modes(
    pool: dspex_trio.Pool, program: str, factory: Any, options: dict[str, Any]
) -> None:
    pid = await pool.create_program(module=program)
    async with pool.compile(
        pid, optimizer="mipro_v2", trainset=TRAIN, valset=VAL, metric="agrees", options=options
    ) as job:
        result = await job.wait()
    theirs = dspy_mipro(options, factory)
    assert our_trials(result) == dspy_trials(theirs)
    assert (result.score, without_metadata(result.state)) == (theirs.score, theirs.dump_state())


async def test_a_metric_that_raises_counts_as_dspy_counts_it(pool: dspex_trio.Pool) -> None:
    """Examples whose metric raises fail in the bootstraps and the trials as in DSPy (the same trials
    and state); ``max_errors`` of them in one evaluation make its score 0.0, as in ``dspy.MIPROv2``."""
    data = devset(32, raises=(3, 7, 22, 25))
    train, val = data[:20], data[20:]
    pid = await pool.create_program(module="tuned")
    async with pool.compile(
        pid, optimizer="mipro_v2", trainset=train, valset=val, metric="picky", options=OPTIONS
    ) as job:
        result = await job.wait()
    theirs = dspy_mipro(OPTIONS, metric=jobs_module.picky, data=(train, val))
    assert our_trials(result) == dspy_trials(theirs)
    assert (result.score, without_metadata(result.state)) == (theirs.score, theirs.dump_state())
    # max_errors 2: every evaluation with two failed examples stops, and scores 0.0, as in DSPy
    async with pool.compile(
        pid, optimizer="mipro_v2", trainset=train, valset=val, metric="picky", options=OPTIONS, max_errors=2
    ) as job:
        stopped = await job.wait()
    theirs = dspy_mipro(OPTIONS, metric=jobs_module.picky, data=(train, val), max_errors=2)
    assert our_trials(stopped) == dspy_trials(theirs)
    assert 0.0 in [c["score"] for c in stopped.candidates]
    assert [p["id"] for p in await pool.list_programs()] == [pid, result.program, stopped.program]


async def test_a_worker_sigkilled_during_the_trials_changes_nothing() -> None:
    options = dspex_trio.PoolOptions(workers=2, restart_intensity=1000, min_healthy_uptime=0.0)
    kills: list[int] = []
    async with dspex_trio.open_pool(options=options, programs=[APP]) as pool:
        pid = await pool.create_program(module="tuned")
        with trio.fail_after(120):  # a failure bound, not a sleep
            async with pool.compile(
                pid, optimizer="mipro_v2", trainset=TRAIN, valset=VAL, metric="agrees", options=OPTIONS
            ) as job:
                async for progress in job:
                    wanted = (progress.trials >= 2) + (progress.trials >= 5)  # two kills, trials apart
                    if progress.stage == "search" and len(kills) < wanted and not job.finished:
                        live = [w for w in pool.workers() if w.state in LIVE]
                        if live:
                            os.kill(live[0].pid, signal.SIGKILL)
                            kills.append(live[0].pid)
        result = job.result
    assert kills, "a worker was killed while the trials ran"
    theirs = dspy_mipro(OPTIONS)
    assert our_trials(result) == dspy_trials(theirs), f"killed {kills}"
    assert without_metadata(result.state) == theirs.dump_state()


async def test_a_worker_killed_during_the_instruction_proposal_loses_nothing() -> None:
    """The proposal is one call of many LM requests (here to a fake LM answering in 0.1 s): its worker
    SIGKILLed while it runs, the call is sent again and the job ends as ``dspy.MIPROv2`` does with the
    same LM."""
    options = {
        "auto": None,
        "num_candidates": 3,
        "num_trials": 2,
        "minibatch": False,
        "max_bootstrapped_demos": 1,
        "max_labeled_demos": 1,
        "seed": 0,
    }
    train, val = devset(6), devset(10)[6:]
    pool_options = dspex_trio.PoolOptions(workers=2, restart_intensity=1000, min_healthy_uptime=0.0)
    async with (
        open_fake_lm(latency_s=0.1) as fake,
        dspex_trio.open_pool(options=pool_options, programs=[APP]) as pool,
    ):
        await pool.configure_lm("openai/fake", api_base=fake.url, api_key="x", num_retries=0)
        pid = await pool.create_program(module="tuned")
        killed: list[int] = []
        with trio.fail_after(120):  # a failure bound, not a sleep
            async with pool.compile(
                pid, optimizer="mipro_v2", trainset=train, valset=val, metric="agrees", options=options
            ) as job:
                async for progress in job:
                    if progress.stage == "propose" and not killed:
                        await wait_until(
                            lambda: any(w.in_flight for w in pool.workers()),
                            60,
                            lambda: f"the proposal call running on a worker: {pool.workers()}",
                        )
                        busy = next(w for w in pool.workers() if w.in_flight)
                        os.kill(busy.pid, signal.SIGKILL)
                        killed.append(busy.pid)
            result = job.result
        stats = pool.statistics()
        lm = dspy.LM("openai/fake", api_base=fake.url, api_key="x", num_retries=0, cache=False)
        constructor = {k: v for k, v in options.items() if k not in COMPILE_ARGS}
        with warnings.catch_warnings(), dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
            warnings.simplefilter("ignore")
            theirs = await trio.to_thread.run_sync(
                lambda: dspy.MIPROv2(metric=jobs_module.agrees, num_threads=4, **constructor).compile(
                    jobs_module.Tuned(),
                    trainset=examples(train),
                    valset=examples(val),
                    **{k: options[k] for k in COMPILE_ARGS if k in options},
                )
            )
    assert killed, "a worker was killed while the proposal ran"
    assert stats.retried + stats.redispatched >= 1, stats
    assert our_trials(result) == dspy_trials(theirs)
    assert without_metadata(result.state) == theirs.dump_state()


async def test_cancelling_mipro_v2_mid_trial_leaves_no_program_behind(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="tuned")
    qa = await pool.create_program(module="qa")
    with trio.fail_after(120):  # a failure bound, not a sleep
        async with pool.compile(
            pid, optimizer="mipro_v2", trainset=TRAIN, valset=VAL, metric="agrees", options=OPTIONS
        ) as job:
            async for progress in job:
                if progress.stage == "search" and progress.trials >= 2:
                    break  # between or inside trials: candidate programs come and go
    assert progress.stage == "search" and progress.trials < progress.total_trials, progress
    with pytest.raises(dspex_trio.JobCancelled):
        job.result  # noqa: B018
    assert {p["id"] for p in await pool.list_programs()} == {pid, qa}
    assert "answer" in await pool.execute(qa, {"question": "still there?"})


async def test_bad_mipro_v2_options_are_refused_before_anything_runs(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="qa")

    async def refused(match: str, options: dict[str, Any], **kwargs: Any) -> None:
        arguments = {"trainset": TRAIN, "valset": VAL, "metric": "agrees"} | kwargs
        with pytest.raises(dspex_trio.InvalidParams, match=match):
            async with pool.compile(pid, optimizer="mipro_v2", options=options, **arguments):
                pass

    await refused("unknown option", {"max_demos": 3})
    await refused("auto must be one of light, medium, heavy", {"auto": "extreme"})
    await refused("num_candidates and num_trials only with auto null", {"num_candidates": 4})
    await refused("auto null needs num_candidates and num_trials", {"auto": None, "num_candidates": 4})
    await refused(r"num_trials must be an integer within \[1, 1000\]", {**OPTIONS, "num_trials": 0})
    await refused(
        r"minibatch_size \(35\) cannot exceed the valset's size \(12\)", {**OPTIONS, "minibatch_size": 35}
    )
    await refused("max_bootstrapped_demos >= 1", {**OPTIONS, "max_bootstrapped_demos": 0})
    await refused("at least 2 trainset examples", OPTIONS, trainset=TRAIN[:1], valset=None)
    await refused("minibatch must be a boolean", {**OPTIONS, "minibatch": "yes"})
    await refused("unknown metric 'nope'", OPTIONS, metric="nope")
    assert [p["id"] for p in await pool.list_programs()] == [pid]
