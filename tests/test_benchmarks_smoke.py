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


def test_family_12_lm_in_flight_runs_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Family 12 (LM calls in flight, issue 17): 16 callers at 0.3 s, both paths."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import lm_layer

    result = lm_layer.measure({"implementations": ["async", "threads"], "in_flight": 16, "latency": 0.3})
    assert result["errors"] == []
    rows = {(r["implementation"], r["metric"]): r for r in result["rows"]}
    assert rows[("ideal", "executions_per_s")]["value"] == 16 / 0.3
    for impl in ("async", "threads"):
        assert rows[(impl, "executions_per_s")]["completed"] > 0
        assert (impl, "worker_rss_growth") in rows
