"""``dspex-trio evaluate`` and ``dspex-trio compile`` as a user runs them (a subprocess, JSONL files):
DSPy's score, a state file that plain DSPy loads, a summary table, and one error line with exit
status 1 for a job that fails or bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import trio

import dspex_trio
from tests import jobs_module
from tests.dspex_trio.test_compile import demos_of
from tests.dspex_trio.test_jobs import devset, dspy_evaluate

CLI = [sys.executable, "-m", "dspex_trio"]
APP = "tests.jobs_module"


def write_jsonl(path: Path, examples: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return str(path)


async def cli(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [*CLI, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_evaluate_prints_dspy_s_score_and_writes_each_result(tmp_path: Path) -> None:
    examples = devset(50, boom=(7,))
    data = write_jsonl(tmp_path / "dev.jsonl", examples)
    common = ["--programs", APP, "--program", "fragile", "--metric", "agrees", "--devset", data]
    code, out, err = await cli("evaluate", *common, "--json", "--out", str(tmp_path / "results.jsonl"))
    assert code == 0, err
    expected = dspy_evaluate(jobs_module.Fragile(), examples, jobs_module.agrees)
    assert json.loads(out) == {"score": expected.score, "errors": 1, "examples": 50}
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["score"] for r in results] == [score for _, _, score in expected.results]
    code, out, err = await cli("evaluate", *common)
    assert code == 0, err
    assert "evaluate fragile with agrees" in out and f"{expected.score:.2f}" in out


async def test_evaluate_exits_1_with_one_line_when_the_job_fails_or_the_input_is_bad(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "dev.jsonl", devset(20, boom=(1, 2, 3)))
    common = ["--programs", APP, "--program", "fragile", "--devset", data]
    code, _, err = await cli("evaluate", *common, "--metric", "agrees", "--max-errors", "2")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("dspex-trio evaluate: error: the evaluation stopped: 2")
    code, _, err = await cli("evaluate", *common, "--metric", "nope")
    assert code == 1 and "unknown metric 'nope'" in err.strip().splitlines()[-1]
    (tmp_path / "bad.jsonl").write_text('{"inputs": {"question": "q"}}\nnot json\n')
    code, _, err = await cli(
        "evaluate", *common[:4], "--devset", str(tmp_path / "bad.jsonl"), "--metric", "agrees"
    )
    assert code == 1 and "bad.jsonl:2: not JSON" in err


async def test_compile_writes_a_state_that_plain_dspy_loads(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", devset(16))
    val = write_jsonl(tmp_path / "val.jsonl", devset(24)[16:])
    out = tmp_path / "state.json"
    common = [
        "--programs",
        APP,
        "--program",
        "qa",
        "--metric",
        "agrees",
        "--trainset",
        train,
        "--out",
        str(out),
    ]
    code, stdout, err = await cli("compile", *common, "--optimizer", "bootstrap_few_shot")
    assert code == 0, err
    state = json.loads(out.read_text())
    loaded = jobs_module.qa()
    loaded.load(str(out))
    assert loaded.demos and [dict(d) for d in loaded.demos] == demos_of(state)["self"]
    assert "self" in stdout and str(len(loaded.demos)) in stdout
    code, stdout, err = await cli(
        "compile",
        *common,
        "--valset",
        val,
        "--optimizer",
        "bootstrap_few_shot_with_random_search",
        "--option",
        "num_candidate_programs=1",
        "--option",
        "max_bootstrapped_demos=2",
    )
    assert code == 0, err
    assert "candidates" in stdout and "(best)" in stdout
    code, _, err = await cli(
        "compile", *common, "--optimizer", "bootstrap_few_shot", "--option", "max_demos=2"
    )
    assert code == 1 and "unknown option(s) 'max_demos'" in err


async def test_jobs_run_on_a_served_endpoint_with_url(tmp_path: Path) -> None:
    """``--url``: the job runs on the server (its programs, its workers) through the remote client; the
    same score as DSPy, and mipro_v2's state and trials."""
    from tests.dspex_trio.test_compile_mipro import OPTIONS, TRAIN, VAL, dspy_mipro, without_metadata
    from tests.dspex_trio.test_websocket import start_server

    examples = devset(30, boom=(4,))
    dev = write_jsonl(tmp_path / "dev.jsonl", examples)
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    val = write_jsonl(tmp_path / "val.jsonl", VAL)
    out = tmp_path / "state.json"
    async with (
        dspex_trio.open_pool(workers=2, programs=[APP]) as pool,
        trio.open_nursery() as nursery,
    ):
        server = await start_server(nursery, pool)
        url = ["--url", server.url]
        code, stdout, err = await cli(
            "evaluate", *url, "--program", "fragile", "--metric", "agrees", "--devset", dev, "--json"
        )
        assert code == 0, err
        expected = dspy_evaluate(jobs_module.Fragile(), examples, jobs_module.agrees)
        assert json.loads(stdout) == {"score": expected.score, "errors": 1, "examples": 30}
        options = [f"--option={name}={json.dumps(value)}" for name, value in OPTIONS.items()]
        code, stdout, err = await cli(
            "compile",
            *url,
            "--program",
            "tuned",
            "--metric",
            "agrees",
            "--trainset",
            train,
            "--valset",
            val,
            "--optimizer",
            "mipro_v2",
            *options,
            "--out",
            str(out),
        )
        assert code == 0, err
        theirs = dspy_mipro(OPTIONS)
        assert without_metadata(json.loads(out.read_text())) == theirs.dump_state()
        assert "trials" in stdout and f"best full evaluation: {theirs.score:.2f}" in stdout, stdout
        # options that belong to a pool of its own are refused with --url, in one line
        code, _, err = await cli(
            "evaluate", *url, "--programs", APP, "--program", "qa", "--metric", "agrees", "--devset", dev
        )
        assert code == 1 and "with --url the server's are used" in err.strip().splitlines()[-1], err
        nursery.cancel_scope.cancel()
    # nothing listens there any more
    code, _, err = await cli("evaluate", *url, "--program", "qa", "--metric", "agrees", "--devset", dev)
    assert code == 1 and f"cannot connect to {server.url}" in err.strip().splitlines()[-1], err
