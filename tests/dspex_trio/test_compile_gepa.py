"""``pool.compile(..., optimizer="gepa")`` on the real pool (real workers, real DSPy, the offline LM as the
task and the reflection LM): the same candidates (instructions, parents, valset scores) and the same
optimized state as ``dspy.GEPA`` run in-process on the same program, metric, data and seed; a worker
SIGKILLed during the run changes nothing; cancelling leaves no program behind; bad options and a metric
without GEPA's five arguments are refused before anything runs. Real processes mean real time: bounded
waits only, no timing asserted.
"""

from __future__ import annotations

import json
import os
import signal
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
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

pytestmark = pytest.mark.real_processes

APP = "tests.jobs_module"
LIVE = (dspex_trio.WorkerState.READY, dspex_trio.WorkerState.BUSY)
OPTIONS: dict[str, Any] = {"max_metric_calls": 100, "seed": 7}
"""With this seed a proposed instruction beats the student (checked below)."""
TRAIN, VAL = devset(12), devset(20)[12:]


@pytest.fixture
async def pool() -> AsyncIterator[dspex_trio.Pool]:
    async with dspex_trio.open_pool(workers=2, programs=[APP]) as pool:
        yield pool


def examples(data: list[dict[str, Any]]) -> list[dspy.Example]:
    return [dspy.Example(**e["inputs"], **e["labels"]).with_inputs(*e["inputs"]) for e in data]


def dspy_gepa(
    options: dict[str, Any],
    factory: Any = jobs_module.Tuned,
    *,
    metric: Any = jobs_module.agrees_with_feedback,
    reflection_lm: Any = None,
    data: tuple[list[dict[str, Any]], list[dict[str, Any]]] = (TRAIN, VAL),
) -> dspy.Module:
    """``dspy.GEPA`` in this process, with the offline LM the workers use as the task and reflection LM."""
    with warnings.catch_warnings(), dspy.context(lm=offline_lm(), adapter=dspy.ChatAdapter()):
        warnings.simplefilter("ignore")
        options = {k: v for k, v in options.items() if k != "reflection_lm"}
        optimizer = dspy.GEPA(
            metric=metric,
            reflection_lm=reflection_lm or offline_lm(),
            num_threads=4,
            track_stats=True,
            **options,
        )
        return optimizer.compile(factory(), trainset=examples(data[0]), valset=examples(data[1]))


def theirs_candidates(best: dspy.Module) -> list[dict[str, Any]]:
    details = best.detailed_results
    return [
        {
            "candidate": i,
            "instructions": {name: p.signature.instructions for name, p in cand.named_predictors()},
            "score": details.val_aggregate_scores[i],
            "parents": list(details.parents[i]),
        }
        for i, cand in enumerate(details.candidates)
    ]


def without_metadata(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "metadata"}


async def test_gepa_gives_dspy_s_candidates_and_optimized_program(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="tuned")
    seen: list[Any] = []
    async with pool.compile(
        pid, optimizer="gepa", trainset=TRAIN, valset=VAL, metric="agrees_with_feedback", options=OPTIONS
    ) as job:
        async for progress in job:
            seen.append(progress)
    result = job.result
    theirs = dspy_gepa(OPTIONS)
    assert list(result.candidates) == theirs_candidates(theirs)
    assert without_metadata(result.state) == theirs.dump_state()
    student = await pool.get_state(pid)
    assert without_metadata(result.state) != without_metadata(student), "a candidate beat the student"
    assert result.score == max(c["score"] for c in result.candidates)
    assert {p["id"] for p in await pool.list_programs()} == {pid, result.program}
    assert seen and seen[-1].best_score == result.score, seen[-1:]
    # progress: the search only; its iterations, and the metric calls used of the budget
    assert {p.stage for p in seen} == {"search"}, seen
    assert seen[-1].done == seen[-1].total == OPTIONS["max_metric_calls"], seen[-1]
    assert seen[-1].trials >= len(result.candidates) - 1, seen[-1]


@pytest.mark.parametrize(
    "options",
    [
        # round robin over the predictors; with this seed a merge of two candidates wins
        {"max_metric_calls": 120, "seed": 0},
        # every predictor updated at each step, no merges
        {"max_metric_calls": 120, "seed": 0, "component_selector": "all", "use_merge": False},
    ],
    ids=["round_robin_with_merge", "all_components"],
)
async def test_gepa_follows_dspy_with_two_predictors(pool: dspex_trio.Pool, options: dict[str, Any]) -> None:
    pid = await pool.create_program(module="tuned_two_step")
    async with pool.compile(
        pid, optimizer="gepa", trainset=TRAIN, valset=VAL, metric="agrees_with_feedback", options=options
    ) as job:
        result = await job.wait()
    theirs = dspy_gepa(options, jobs_module.TunedTwoStep)
    assert list(result.candidates) == theirs_candidates(theirs)
    assert without_metadata(result.state) == theirs.dump_state()
    assert len(result.candidates) > 2, result.candidates
    if options.get("use_merge", True):
        assert any(len(c["parents"]) == 2 for c in result.candidates), "a merge was accepted"


async def test_a_program_or_metric_that_raises_counts_as_dspy_counts_it(pool: dspex_trio.Pool) -> None:
    """Examples whose program or metric raises: dropped from the traces and scored ``failure_score``,
    in the minibatches and on the valset, as ``dspy.GEPA`` does (the same candidates and state)."""
    data = devset(20, boom=(2, 15), raises=(5, 17))
    train, val = data[:12], data[12:]
    options = {**OPTIONS, "failure_score": 0.0}
    pid = await pool.create_program(module="tuned_fragile")
    async with pool.compile(
        pid, optimizer="gepa", trainset=train, valset=val, metric="picky_with_feedback", options=options
    ) as job:
        result = await job.wait()
    theirs = dspy_gepa(
        options, jobs_module.TunedFragile, metric=jobs_module.picky_with_feedback, data=(train, val)
    )
    assert list(result.candidates) == theirs_candidates(theirs)
    assert without_metadata(result.state) == theirs.dump_state()
    assert len(result.candidates) > 1, result.candidates


async def test_a_worker_sigkilled_during_the_run_changes_nothing() -> None:
    options = dspex_trio.PoolOptions(workers=2, restart_intensity=1000, min_healthy_uptime=0.0)
    kills: list[int] = []
    async with dspex_trio.open_pool(options=options, programs=[APP]) as pool:
        pid = await pool.create_program(module="tuned")
        with trio.fail_after(120):  # a failure bound, not a sleep
            async with pool.compile(
                pid,
                optimizer="gepa",
                trainset=TRAIN,
                valset=VAL,
                metric="agrees_with_feedback",
                options=OPTIONS,
            ) as job:
                async for progress in job:
                    wanted = (progress.done >= 10) + (progress.done >= 30)  # two kills, calls apart
                    if len(kills) < wanted and not job.finished:
                        live = [w for w in pool.workers() if w.state in LIVE]
                        if live:
                            os.kill(live[0].pid, signal.SIGKILL)
                            kills.append(live[0].pid)
        result = job.result
    assert kills, "a worker was killed while GEPA ran"
    theirs = dspy_gepa(OPTIONS)
    assert list(result.candidates) == theirs_candidates(theirs), f"killed {kills}"
    assert without_metadata(result.state) == theirs.dump_state()


async def test_a_worker_killed_during_a_reflection_loses_nothing() -> None:
    """The reflection LM a named session configured (a fake LM answering in 0.5 s; the task LM stays
    the offline one): when its first request arrives a proposal is the only call running (the engine is
    sequential), and its worker is SIGKILLed; the call is sent again and the job ends as ``dspy.GEPA``
    does with the same reflection LM."""
    options = {"max_metric_calls": 40, "seed": 7, "reflection_lm": "reflector"}
    pool_options = dspex_trio.PoolOptions(workers=2, restart_intensity=1000, min_healthy_uptime=0.0)
    async with (
        open_fake_lm(latency_s=0.5) as fake,
        dspex_trio.open_pool(options=pool_options, programs=[APP]) as pool,
    ):
        await pool.configure_lm(
            "openai/fake", api_base=fake.url, api_key="x", num_retries=0, session="reflector"
        )
        pid = await pool.create_program(module="tuned")
        killed: list[int] = []
        with trio.fail_after(120):  # a failure bound, not a sleep
            async with pool.compile(
                pid,
                optimizer="gepa",
                trainset=TRAIN,
                valset=VAL,
                metric="agrees_with_feedback",
                options=options,
            ) as job:
                await wait_until(lambda: fake.requests >= 1, 60, lambda: f"a reflection request: {fake!r}")
                busy = [w for w in pool.workers() if w.in_flight]
                if busy:
                    os.kill(busy[0].pid, signal.SIGKILL)
                    killed.append(busy[0].pid)
                result = await job.wait()
        stats = pool.statistics()
        reflection = dspy.LM("openai/fake", api_base=fake.url, api_key="x", num_retries=0, cache=False)
        theirs = await trio.to_thread.run_sync(
            lambda: dspy_gepa({**options, "reflection_lm": None}, reflection_lm=reflection)
        )
    assert killed, "a worker was killed while the reflection ran"
    assert stats.retried + stats.redispatched >= 1, stats
    assert list(result.candidates) == theirs_candidates(theirs)
    assert len(result.candidates) > 1, result.candidates
    assert without_metadata(result.state) == theirs.dump_state()


async def test_cancelling_gepa_stops_it_and_leaves_no_program(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="tuned")
    with trio.fail_after(60):  # a failure bound, not a sleep
        async with pool.compile(
            pid,
            optimizer="gepa",
            trainset=TRAIN,
            valset=VAL,
            metric="agrees_with_feedback",
            options={"max_metric_calls": 10_000},
        ) as job:
            async for progress in job:
                if progress.trials >= 2:
                    break
    assert progress.stage == "search"
    with pytest.raises(dspex_trio.JobCancelled):
        job.result  # noqa: B018
    assert [p["id"] for p in await pool.list_programs()] == [pid]
    # the pool serves others at once
    assert await pool.execute(pid, {"question": "still there?"})


async def test_bad_gepa_input_is_refused_before_anything_runs(pool: dspex_trio.Pool) -> None:
    pid = await pool.create_program(module="tuned")

    async def refused(match: str, **kwargs: Any) -> None:
        arguments = {
            "optimizer": "gepa",
            "trainset": TRAIN,
            "metric": "agrees_with_feedback",
            "options": OPTIONS,
        } | kwargs
        with pytest.raises(dspex_trio.InvalidParams, match=match):
            async with pool.compile(pid, **arguments):
                pass

    await refused("five arguments", metric="agrees")
    await refused("exactly one of auto, max_full_evals, max_metric_calls", options={})
    await refused(r"exactly one of .* \(got auto, max_metric_calls\)", options={**OPTIONS, "auto": "light"})
    await refused("max_metric_calls must be an integer within", options={"max_metric_calls": 10**9})
    await refused("above the limit", options={"max_full_evals": 90_000})
    await refused("auto must be one of", options={"auto": "huge"})
    await refused("candidate_selection_strategy", options={**OPTIONS, "candidate_selection_strategy": "x"})
    await refused("unknown option", options={**OPTIONS, "log_dir": "/"})
    await refused("reflection_lm: no session 'nobody'", options={**OPTIONS, "reflection_lm": "nobody"})
    assert [p["id"] for p in await pool.list_programs()] == [pid]


async def test_the_cli_runs_gepa_in_a_pool_of_its_own_and_over_the_websocket(tmp_path: Path) -> None:
    """``dspex-trio compile --optimizer gepa``: DSPy's optimized state and the candidates table, with a
    pool of its own and on a served endpoint (the websocket job and the remote client)."""
    from tests.dspex_trio.test_cli_jobs import cli, write_jsonl
    from tests.dspex_trio.test_websocket import start_server

    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    val = write_jsonl(tmp_path / "val.jsonl", VAL)
    out = tmp_path / "state.json"
    options = [f"--option={name}={json.dumps(value)}" for name, value in OPTIONS.items()]
    common = [
        "--program",
        "tuned",
        "--metric",
        "agrees_with_feedback",
        "--trainset",
        train,
        "--valset",
        val,
        "--optimizer",
        "gepa",
        *options,
        "--out",
        str(out),
    ]
    theirs = dspy_gepa(OPTIONS)
    code, stdout, err = await cli("compile", "--programs", APP, *common)
    assert code == 0, err
    assert without_metadata(json.loads(out.read_text())) == theirs.dump_state()
    assert "candidates" in stdout and "(best)" in stdout, stdout
    out.unlink()
    async with (
        dspex_trio.open_pool(workers=2, programs=[APP]) as pool,
        trio.open_nursery() as nursery,
    ):
        server = await start_server(nursery, pool)
        code, stdout, err = await cli("compile", "--url", server.url, *common, "--json")
        nursery.cancel_scope.cancel()
    assert code == 0, err
    assert without_metadata(json.loads(out.read_text())) == theirs.dump_state()
    assert json.loads(stdout)["candidates"] == theirs_candidates(theirs)


async def test_a_named_session_s_lm_is_the_reflection_lm(pool: dspex_trio.Pool) -> None:
    """``reflection_lm``: the LM configured for that session reflects (the offline LM here: the same
    result as the job's own session's LM)."""
    await pool.configure_lm("offline", session="reflector")
    pid = await pool.create_program(module="tuned")
    options = {**OPTIONS, "reflection_lm": "reflector"}
    async with pool.compile(
        pid, optimizer="gepa", trainset=TRAIN, valset=VAL, metric="agrees_with_feedback", options=options
    ) as job:
        result = await job.wait()
    assert list(result.candidates) == theirs_candidates(dspy_gepa(OPTIONS))


async def test_a_minted_session_cannot_borrow_a_named_session_s_lm(pool: dspex_trio.Pool) -> None:
    await pool.configure_lm("offline", session="operators")
    minted = await pool.open_session()
    pid = await pool.create_program(module="tuned", session=minted)
    with pytest.raises(dspex_trio.InvalidParams, match="names another minted session"):
        async with pool.compile(
            pid,
            optimizer="gepa",
            trainset=TRAIN,
            metric="agrees_with_feedback",
            options={**OPTIONS, "reflection_lm": "operators"},
            session=minted,
        ):
            pass


async def test_a_metric_that_raises_giving_feedback_stops_each_proposal_as_in_dspy(
    pool: dspex_trio.Pool,
) -> None:
    """The engine catches an exception building the reflective dataset and proposes nothing that
    iteration: with a metric that raises whenever it is asked for feedback, the run ends with the
    student alone, in DSPy and on the pool."""
    pid = await pool.create_program(module="tuned")
    with trio.fail_after(60):  # a failure bound, not a sleep
        async with pool.compile(
            pid, optimizer="gepa", trainset=TRAIN, valset=VAL, metric="feedback_raises", options=OPTIONS
        ) as job:
            result = await job.wait()
    theirs = dspy_gepa(OPTIONS, metric=jobs_module.feedback_raises)
    assert list(result.candidates) == theirs_candidates(theirs)
    assert [c["candidate"] for c in result.candidates] == [0]
    assert without_metadata(result.state) == without_metadata(await pool.get_state(pid))
