"""Machinery shared by the benchmarks: fresh measuring subprocesses on a snapshot of the code, rotation,
pinning, leftover-process checks, machine facts.

Every benchmark run copies the measured packages into a temporary directory (:func:`snapshot_tree`) and
runs each *round* in a fresh measuring subprocess (:func:`run_measure`) importing them from the copy, so
every round measures the same code even while the working tree is being edited. Every process a run
starts carries a tag in its environment (:data:`TAG_ENV`); after each round the driver looks for tagged
processes in ``/proc`` (:func:`reap_leftovers`), waits a little, then SIGKILLs and reports any.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The repository (or, in a measuring subprocess, the snapshot of it)."""
SNAPSHOT_PACKAGES = ("dspex_trio", "bridge_child", "benchmarks")
"""Copied at the start of a run; the measuring subprocesses import these from the copy."""
TAG_ENV = "DSPEX_BENCH_TAG"
"""Set in the environment of every process a benchmark starts (leftover check)."""
MEASURED_FILES = (
    "dspex_trio/_worker.py",
    "dspex_trio/_dispatch.py",
    "dspex_trio/_retry.py",
    "dspex_trio/_pool.py",
    "dspex_trio/_launcher.py",
    "dspex_trio/_pool_launcher.py",
    "dspex_trio/_zygote.py",
    "dspex_trio/_websocket.py",
    "dspex_trio/_ws_api.py",
    "bridge_child/_server.py",
    "bridge_child/_lane.py",
    "bridge_child/_zygote.py",
    "bridge_child/_programs.py",
    "bridge_child/spec.py",
    "bridge_child/wire.py",
)
"""Digested into the results, so two runs can tell whether they measured the same code."""
VERSIONED = (
    "dspex-trio",
    "dspy",
    "trio",
    "trio-parallel",
    "trio-websocket",
    "anyio",
    "msgspec",
    "outcome",
    "attrs",
    "numpy",
    "matplotlib",
    "rich",
)


def check(got: Any, want: Any) -> None:
    if got != want:
        raise AssertionError(f"wrong reply {got!r}, expected {want!r}")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of ``values`` (not empty)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summarize_latencies(ns: list[int]) -> dict[str, float]:
    """Median and p99 (nearest rank) in microseconds of latencies in nanoseconds."""
    return {"median": statistics.median(ns) / 1000, "p99": percentile(ns, 99) / 1000}


def summarize_run(latencies: list[float], errors: list[str], elapsed: float) -> dict[str, Any]:
    """A closed-loop run: completed calls per second over ``elapsed``, failures (the first one named),
    latency p50 and p99 (nearest rank) in ms of ``latencies`` in seconds."""
    return {
        "rate": len(latencies) / elapsed,
        "calls": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": percentile(latencies, 99) * 1000 if latencies else None,
    }


def run_one(fn: Callable[..., Any], how: str, *args: Any, time_limit: float) -> Any:
    """Run one implementation to completion in this process, bounded by ``time_limit`` seconds.

    ``how``: "sync" (a plain call; it bounds itself), "trio" or "asyncio" (an event loop of its own)."""
    if how == "sync":
        return fn(*args)

    async def bounded() -> Any:
        import anyio

        with anyio.fail_after(time_limit):
            return await fn(*args)

    if how == "trio":
        import trio

        return trio.run(bounded)
    import anyio

    return anyio.run(bounded, backend="asyncio")


class CountUnknownChild(logging.Filter):
    """Counts (and hides) asyncio's "Unknown child process pid N, will report returncode 255": a race in
    the asyncio backend's teardown of anyio's workers (killed, then reaped by ``Popen.poll()`` before the
    child watcher's ``waitpid``); the worker is gone either way. The count is reported."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "Unknown child process" in str(record.msg):
            self.count += 1
            return False
        return True


# -- processes left behind -----------------------------------------------------------------------------
def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (ours, still alive; zombies not counted)."""
    needle = f"{TAG_ENV}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat", "rb") as st:
                        if st.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                            continue  # a zombie is reported by whoever should reap it, not counted
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def reap_leftovers(tag: str, grace: float = 3.0) -> list[int]:
    """Wait up to ``grace`` s for tagged processes to go; SIGKILL and return those that did not."""
    deadline = time.monotonic() + grace
    while (pids := tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# -- other load on the machine -------------------------------------------------------------------------
def cpu_busy(interval: float = 0.3) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat): other load on the machine."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_quiet(limit: float, threshold: float = 0.15) -> float:
    """Wait up to ``limit`` seconds for the machine to be quiet; returns the last busy fraction."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    return busy


# -- snapshots and measuring subprocesses --------------------------------------------------------------
def child_env(tag: str, tree: str) -> dict[str, str]:
    """The environment of a measuring subprocess: tagged, importing the packages from ``tree``."""
    path = os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        TAG_ENV: tag,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": path,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_OFFLINE_MODE": "true",
    }


def snapshot_tree() -> str:
    """Copy the packages measured into a temporary directory: every round of a run measures the same
    code even while others edit the working tree."""
    tree = tempfile.mkdtemp(prefix="dspex-bench-")
    for package in SNAPSHOT_PACKAGES:
        shutil.copytree(
            os.path.join(ROOT, package),
            os.path.join(tree, package),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return tree


def run_measure(
    module: str, spec: dict[str, Any], tag: str, timeout: float, tree: str, *, quiet: bool = False
) -> dict[str, Any]:
    """Run ``python -m <module> --_measure <spec> <out>`` in ``tree``, tagged, bounded by ``timeout``;
    its JSON answer plus ``leftovers`` (tagged processes still alive after it, killed), or ``error``."""
    env = child_env(tag, tree)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        argv = [sys.executable, "-m", module, "--_measure", json.dumps(spec), out.name]
        try:
            subprocess.run(
                argv,
                env=env,
                timeout=timeout,
                check=True,
                cwd=tree,
                stdout=subprocess.DEVNULL if quiet else None,
                stderr=subprocess.PIPE if quiet else None,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"round timed out after {timeout:.0f} s", "leftovers": reap_leftovers(tag, 0)}
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
            return {
                "error": f"measuring process failed ({exc.returncode})"
                + (": " + " | ".join(tail) if tail else ""),
                "leftovers": reap_leftovers(tag),
            }
        try:
            result: dict[str, Any] = json.load(out)
        except ValueError:
            return {"error": "measuring process wrote no result", "leftovers": reap_leftovers(tag)}
    result["leftovers"] = reap_leftovers(tag)
    return result


# -- facts ---------------------------------------------------------------------------------------------
def git(*cmd: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", ROOT, *cmd], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def code_under_test(tree: str = ROOT, files: Sequence[str] = MEASURED_FILES) -> dict[str, Any]:
    """The commit of the working tree, and a digest of the measured files in ``tree`` (the snapshot)."""
    digests = {}
    for name in files:
        try:
            with open(os.path.join(tree, name), "rb") as f:
                digests[name] = hashlib.sha256(f.read()).hexdigest()[:12]
        except OSError:
            digests[name] = "?"
    info: dict[str, Any] = {"measured_from": tree, "sha256_12": digests}
    if os.path.isdir(os.path.join(ROOT, ".git")):
        info["commit"] = git("rev-parse", "--short", "HEAD")
        info["modified_vs_commit"] = [
            line[3:] for line in git("status", "--porcelain", "--", *files).splitlines()
        ]
    return info


def versions(dists: Sequence[str] = VERSIONED) -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except Exception:
            out[d] = "?"
    return out


def machine_facts(cpu: int | None, all_cpus: list[int], dists: Sequence[str] = VERSIONED) -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "cores": os.cpu_count(),
        "cpus_allowed": all_cpus,
        "pinned_cpu": cpu,
        "cpu_model": model,
        "memory_bytes": mem_total,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "versions": versions(dists),
    }


def rotate(names: list[str], k: int) -> list[str]:
    if not names:
        return names
    k %= len(names)
    return names[k:] + names[:k]


def imported_from() -> dict[str, str]:
    return {
        name: os.path.dirname(getattr(sys.modules.get(name), "__file__", None) or "?")
        for name in ("dspex_trio", "bridge_child", "benchmarks")
    }


async def close_child(process: Any, stdin: Any, stdout: Any, grace: float = 5.0) -> None:
    """Close a benchmark child: EOF on its stdin, up to ``grace`` seconds to exit, else SIGKILL; then
    reap it and close its stdout. Shielded: runs to the end even when the caller is cancelled."""
    import trio

    with trio.CancelScope(shield=True):
        await stdin.aclose()
        with trio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await stdout.aclose()


async def timed_calls(call: Any, warmup: Sequence[int], timed: Sequence[int]) -> list[int]:
    """``await call(i)`` for each warm-up id, then time each timed id, in nanoseconds; every answer must
    equal its id."""
    import gc

    for i in warmup:
        check(await call(i), i)
    gc.collect()
    pc = time.perf_counter_ns
    out = []
    for i in timed:
        t0 = pc()
        value = await call(i)
        out.append(pc() - t0)
        check(value, i)
    return out
