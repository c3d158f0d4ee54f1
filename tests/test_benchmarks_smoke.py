"""The benchmark entry point (`python -m benchmarks`) still runs: one tiny scenario, tiny counts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the benchmarks read /proc")


def test_entry_point_runs_one_tiny_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import __main__ as bench

    out = tmp_path / "results.json"
    status = bench.main(
        [
            "--only",
            "noop",
            "--impl",
            "raw_pipe,raw_pipelined,open_worker",
            "--rounds",
            "1",
            "--n",
            "20",
            "--calls",
            "128",
            "--budget",
            "60",
            "--output",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert status == 0, result["run"]["errors"]
    assert result["run"]["leftover_processes"] == []
    rows = {(r["scenario"], r["implementation"], r["metric"]): r for r in result["rows"]}
    assert rows[("1_round_trip", "open_worker", "p50")]["value"] > 0
    assert rows[("1_round_trip", "open_worker", "p50")]["anchor"] == "raw_pipe"
    assert rows[("2_throughput", "open_worker", "calls_per_s")]["ratio"] is not None
    assert {"cores", "python", "versions"} <= set(result["machine"])
    assert result["run"]["code_under_test"].get("sha256_12")
    assert {t["id"] for t in result["targets"]} >= {"1", "2a", "4", "5"}
    assert os.path.exists(tmp_path / "results" / "noop.png")


def test_the_jobs_family_measures_each_part_with_tiny_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import jobs

    spec = {
        "implementations": ["cpu", "io", "random_search"],
        "examples": 40,
        "io_examples": 256,
        "latency": 0.1,
        "in_flight": 256,
        "train": 8,
        "val": 8,
    }
    result = jobs.measure(spec)
    assert result["errors"] == []
    rows = {(r["scenario"], r["implementation"]) for r in result["rows"]}
    assert rows == {
        ("10_evaluate_cpu", "dspy_evaluate_8_threads"),
        ("10_evaluate_cpu", "pool_2w"),
        ("10_evaluate_io", "ideal"),
        ("10_evaluate_io", "pool_2w"),
        ("10_evaluate_io", "dspy_evaluate_256_threads"),
        ("10_random_search", "in_process_8_threads"),
        ("10_random_search", "pool_2w"),
    }
    assert all(r["value"] > 0 for r in result["rows"])
