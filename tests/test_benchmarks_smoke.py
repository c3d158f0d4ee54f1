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


def test_cold_start_family_measures_pools_on_a_warm_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: family 3's ``warm`` rows (N = 2 and 16) and their target (3w) come out of a real run."""
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import __main__ as bench

    out = tmp_path / "results.json"
    args = ["--only", "cold_start", "--impl", "warm", "--rounds", "1", "--quick", "--budget", "120"]
    status = bench.main([*args, "--output", str(out)])
    result = json.loads(out.read_text())
    assert status == 0, result["run"]["errors"]
    assert result["run"]["leftover_processes"] == []
    rows = {
        (r["implementation"], r["metric"], r["x"]): r
        for r in result["rows"]
        if r["scenario"] == "3_cold_start"
    }
    for n in (2, 16):
        assert rows[("warm", "seconds_to_ready", n)]["value"] > 0
        assert (
            rows[("warm", "seconds_to_ready_p99", n)]["value"]
            >= rows[("warm", "seconds_to_ready", n)]["value"]
        )
    (target,) = [t for t in result["targets"] if t["id"] == "3w"]
    assert (
        target["value"] is not None and target["met"] is not None
    )  # measured (met or not: not asserted here)
