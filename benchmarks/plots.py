"""One PNG per scenario family from the results of ``python -m benchmarks`` (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

Rows = list[dict[str, Any]]


def _select(rows: Rows, scenario: str, metric: str) -> Rows:
    return [r for r in rows if r["scenario"] == scenario and r["metric"] == metric]


def _bars(
    ax: Any, rows: Rows, title: str, unit: str, *, log: bool = False, highlight: tuple[str, ...] = ()
) -> None:
    names = [r["implementation"] for r in rows]
    values = [r["value"] for r in rows]
    colors = ["tab:orange" if n in highlight else "tab:blue" for n in names]
    ax.barh(names, values, color=colors)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    if log:
        ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.3g}", va="center", fontsize=6)


def _lines(ax: Any, rows: Rows, title: str, unit: str, *, logx: bool = True, logy: bool = False) -> None:
    by: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        by.setdefault(r["implementation"], []).append((r["x"], r["value"]))
    for name, points in by.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _grouped(ax: Any, rows: Rows, title: str, unit: str, *, log: bool = True) -> None:
    xs = sorted({r["x"] for r in rows})
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = {r["x"]: r["value"] for r in rows if r["implementation"] == name}
        ax.bar(
            [j + i * width for j in range(len(xs))],
            [vals.get(x, 0) for x in xs],
            width,
            label=name,
        )
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(xs))], [f"N={x}" for x in xs])
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(unit, fontsize=8)
    ax.tick_params(labelsize=7)
    if log:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_noop(plt: Any, rows: Rows) -> Any:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    _bars(
        a,
        _select(rows, "1_round_trip", "p50"),
        "1. no-op round trip, 1 caller (p50, pinned)",
        "µs",
        highlight=("open_worker", "pool"),
    )
    _bars(
        b,
        _select(rows, "2_throughput", "calls_per_s"),
        "2. no-op throughput, 64 callers",
        "calls/s",
        log=True,
        highlight=("open_worker", "pool"),
    )
    return fig


def plot_cold_start(plt: Any, rows: Rows) -> Any:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    _grouped(ax, _select(rows, "3_cold_start", "seconds_to_ready"), "3. cold start to N ready workers", "ms")
    return fig


def plot_recovery(plt: Any, rows: Rows) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3))
    sel = [
        {**r, "implementation": f"{r['implementation']} {r['metric'].removeprefix('kill_to_')}"}
        for r in rows
        if r["scenario"] == "4_recovery"
        and r["metric"] in ("kill_to_ready_p50", "kill_to_ready_p99", "kill_to_failed_p50")
    ]
    _bars(ax, sel, "4. recovery after SIGKILL under load", "ms", log=True)
    return fig


def plot_memory(plt: Any, rows: Rows) -> Any:
    fig, ax = plt.subplots(figsize=(7, 3))
    sel = [
        {**r, "implementation": f"{r['implementation']} {r['metric'].upper()}"}
        for r in rows
        if r["scenario"] == "5_memory" and r["metric"] in ("uss", "pss")
    ]
    _bars(ax, sel, "5. memory per worker after one DSPy execute", "MB")
    return fig


def plot_dspy(plt: Any, rows: Rows) -> Any:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    _bars(
        a,
        _select(rows, "6_dspy_cpu", "executions_per_s"),
        "6. CPU-bound (offline LM)",
        "executions/s",
        highlight=("pool_2w",),
    )
    io = [r for r in _select(rows, "6_dspy_io", "executions_per_s") if r["implementation"] != "cpu_ceiling"]
    _lines(b, io, "6. I/O-bound (fake-lm 100 ms), 2 workers", "executions/s", logy=True)
    for r in _select(rows, "6_dspy_io", "executions_per_s"):
        if r["implementation"] == "cpu_ceiling":
            b.axhline(r["value"], color="gray", linestyle="--", linewidth=0.8)
    b.set_xlabel("concurrent callers", fontsize=8)
    return fig


def plot_websocket(plt: Any, rows: Rows) -> Any:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    _lines(
        a,
        _select(rows, "7_websocket", "executions_per_s"),
        "7. websocket vs in-process: throughput",
        "executions/s",
    )
    lat = [
        {**r, "implementation": f"{r['implementation']} {r['metric'].removeprefix('latency_')}"}
        for r in rows
        if r["scenario"] == "7_websocket" and r["metric"] in ("latency_p50", "latency_p99")
    ]
    _lines(b, lat, "7. latency", "ms", logy=True)
    a.set_xlabel("clients", fontsize=8)
    b.set_xlabel("clients", fontsize=8)
    return fig


def plot_dspex_way(plt: Any, rows: Rows) -> Any:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    _bars(
        a,
        _select(rows, "8_dspex_way", "calls_per_s"),
        "8. no-op throughput, 64 callers, 2 workers",
        "calls/s",
        highlight=("pool",),
    )
    _grouped(
        b, _select(rows, "8_dspex_way", "seconds_to_ready"), "8. cold start (DSPex way: sequential)", "ms"
    )
    return fig


def plot_metrics(plt: Any, rows: Rows) -> Any:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.0))
    _bars(
        a,
        _select(rows, "11_scrape", "p50"),
        "11. one scrape, 64 workers (p50)",
        "ms",
        highlight=("collector",),
    )
    _bars(
        b,
        _select(rows, "11_noop_metrics", "calls_per_s"),
        "11. no-op throughput, metrics on / off",
        "calls/s",
        highlight=("metrics_on",),
    )
    return fig


def plot_jobs(plt: Any, rows: Rows) -> Any:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.4))
    _bars(a, _select(rows, "10_evaluate_cpu", "examples_per_s"), "10a. evaluate, offline LM", "examples/s")
    _bars(b, _select(rows, "10_evaluate_io", "examples_per_s"), "10b. evaluate, fake-lm 100 ms", "examples/s")
    _bars(c, _select(rows, "10_random_search", "seconds"), "10c. random search, 50/50", "s")
    return fig


FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[Any, Rows], Any]]] = {
    "noop": (("1_round_trip", "2_throughput"), plot_noop),
    "cold_start": (("3_cold_start",), plot_cold_start),
    "recovery": (("4_recovery",), plot_recovery),
    "memory": (("5_memory",), plot_memory),
    "dspy": (("6_dspy_cpu", "6_dspy_io"), plot_dspy),
    "websocket": (("7_websocket",), plot_websocket),
    "dspex_way": (("8_dspex_way",), plot_dspex_way),
    "metrics": (("11_scrape", "11_noop_metrics"), plot_metrics),
    "jobs": (("10_evaluate_cpu", "10_evaluate_io", "10_random_search"), plot_jobs),
}


def make_plots(rows: Rows, outdir: str, subtitle: str = "") -> list[str]:
    """Write ``<outdir>/<family>.png`` for every family with rows; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    written = []
    for family, (scenarios, plot) in FAMILIES.items():
        if not any(r["scenario"] in scenarios and isinstance(r["value"], (int, float)) for r in rows):
            continue
        numeric = [r for r in rows if isinstance(r["value"], (int, float))]
        try:
            fig = plot(plt, numeric)
        except Exception:  # a partial run: skip the family rather than fail the run
            plt.close("all")
            continue
        if subtitle:
            fig.text(0.99, 0.01, subtitle, ha="right", va="bottom", fontsize=6, color="gray")
        fig.tight_layout()
        path = os.path.join(outdir, f"{family}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
