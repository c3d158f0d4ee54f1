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


def test_family_11_metrics_runs_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Family 11 (monitoring's cost): a round with 4 workers, a few scrapes and a few calls."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import metrics

    spec = {
        "implementations": ["scrape", "noop"],
        "workers": 4,
        "scrapes": 3,
        "warmup": 64,
        "calls": 256,
        "pairs": 1,
        "cpus": sorted(os.sched_getaffinity(0)),
        "time_limit": 120.0,
    }
    result = metrics.measure(spec)
    assert result["errors"] == []
    rows = {(r["scenario"], r["implementation"], r["metric"]): r["value"] for r in result["rows"]}
    for name in ("statistics", "collector", "http"):
        assert rows[("11_scrape", name, "p50")] > 0
    assert rows[("11_noop_metrics", "metrics_on", "calls_per_s")] > 0
    assert rows[("11_noop_metrics", "metrics_off", "calls_per_s")] > 0
    assert rows[("11_noop_metrics", "metrics_on", "ratio_to_off")] > 0


def test_family_13_ray_pool_runs_tiny(tmp_path: Path) -> None:
    """Family 13 (``benchmarks.ray_pool``, its own entry point): one tiny round in its namespace."""
    import importlib.util
    import shutil
    import subprocess

    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install -e '.[ray]'")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (Ray runs in a loopback-only network namespace)")
    out = tmp_path / "ray.json"
    argv = ["--rounds", "1", "--calls", "640", "--warmup", "64", "--starts", "1", "--output", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.ray_pool", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary["13a_throughput_calls_per_s"]) == {"zygote", "ray", "tcp"}
    assert summary["13a_ratio_ray_vs_zygote"] > 0 and summary["13b_ratio_ray_vs_zygote"] > 0


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


def test_family_12_lm_cancel_runs_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Family 12's cancel scenario: 20 executions in flight on the lane and 10 on threads, cancelled;
    every connection closes and the rows are there (their values are not asserted: timing)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import lm_layer

    errors: list[str] = []
    facts: dict[str, object] = {}
    rows = lm_layer._measure_cancel({"async": 20, "threads": 10}, errors, facts)
    assert errors == []
    assert facts == {
        "cancel_async": {"in_flight": 20, "closed": 20},
        "cancel_threads": {"in_flight": 10, "closed": 10},
    }
    got = {(r["implementation"], r["metric"]): r for r in rows}
    for impl, n in (("async", 20), ("threads", 10)):
        for metric in ("p50", "p99", "max"):
            assert got[(impl, metric)]["scenario"] == "12_lm_cancel"
            assert got[(impl, metric)]["x"] == n
            assert got[(impl, metric)]["value"] >= 0


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


def test_the_jobs_family_measures_each_part_with_tiny_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import jobs

    spec = {
        "implementations": ["cpu", "io", "random_search", "mipro"],
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
        ("10_mipro", "in_process_8_threads"),
        ("10_mipro", "pool_2w"),
    }
    assert all(r["value"] > 0 for r in result["rows"])


def test_family_7_websocket_measures_every_layout_and_the_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Family 7 (issue 20): every part with tiny counts: the main loop (isolated and pinned where the
    machine has 2 CPUs), the unpinned layout, and the client's interleaved pairs with their median
    ratios."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import ws

    spec = {
        "clients": [2],
        "seconds": 0.3,
        "implementations": ["in_process", "websocket", "bare_forwarder", "remote", "websockets_submit"],
        "layouts": ["isolated", "pinned", "unpinned"],
        "pairs": 1,
        "pair_seconds": 0.3,
        "time_limit": 240.0,
    }
    cpus = os.sched_getaffinity(0)
    pinned = len(cpus) >= 2
    result = ws.measure(spec)
    assert os.sched_getaffinity(0) == cpus  # the measuring process's threads were given back every CPU
    assert result["errors"] == []
    rows = {(r["scenario"], r["implementation"], r["metric"]): r["value"] for r in result["rows"]}
    for impl in ("in_process", "websocket", "bare_forwarder"):
        assert rows[("7_websocket_unpinned", impl, "executions_per_s")] > 0
        assert (("7_websocket", impl, "executions_per_s") in rows) is pinned
        assert (("7_websocket_isolated", impl, "executions_per_s") in rows) is pinned
    assert rows[("7_websocket_client", "remote", "rate_ratio_to_raw")] > 0
    assert rows[("7_websocket_client", "remote", "client_cpu_ratio_to_raw")] > 0
    assert rows[("7_websocket_client", "websockets_submit", "client_cpu_per_exec")] > 0
    assert result["facts"]["layouts"] == (["isolated", "pinned", "unpinned"] if pinned else ["unpinned"])


def test_family_7_isolated_layout_finds_and_pins_every_descendant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``isolated`` layout pins the server's descendants (template and workers): ``_descendants``
    finds a child and its grandchild, and ``_pin_all_threads`` moves each one and back."""
    import signal
    import subprocess

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import ws

    cpus = os.sched_getaffinity(0)
    child = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    try:
        found = ws._descendants(os.getpid())
        assert child.pid in found and grandchild in found
        assert found.index(child.pid) < found.index(grandchild)  # parents first
        one = {min(cpus)}
        for pid in (child.pid, grandchild):
            ws._pin_all_threads(one, pid)
            assert os.sched_getaffinity(pid) == one
            ws._pin_all_threads(cpus, pid)
            assert os.sched_getaffinity(pid) == cpus
    finally:
        os.kill(grandchild, signal.SIGKILL)
        child.wait()  # sh's ``wait`` ends with its child
    ws._pin_all_threads(cpus, 2**22 + 1)  # a process that does not exist: nothing to pin, no error
