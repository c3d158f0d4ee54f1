"""Round trip and throughput of dspex-trio's worker handle against its peers, side by side, in one run.

Run with ``python -m benchmarks.roundtrip [--quick] [--json out.json] [--profile]``. Method and figures:
``docs/benchmarks.md``.

(a) **Round trip**: one caller, one worker, a no-op call (``echo`` / ``identity``), latency median and p99
    in microseconds. The measuring process pins itself to one CPU before it starts any worker, so the
    whole process tree (worker included) shares that CPU.
(b) **Throughput**: 64 concurrent callers, calls/s, with the affinity restored to every CPU.

Every measurement runs in a fresh measuring subprocess (``--_measure``), one per *round*; a round runs
each implementation once (warm-up, then the timed calls), in an order rotated from round to round, and
the figure reported is the median over the rounds. Every process the run starts carries a tag in its
environment; after each round the driver checks that none is left (and kills and reports any that is).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from benchmarks import _common
from benchmarks._common import (
    ROOT,
    CountUnknownChild,
    check,
    child_env,
    close_child,
    code_under_test,
    machine_facts,
    reap_leftovers,
    rotate,
    run_one,
    snapshot_tree,
    summarize_latencies,
    timed_calls,
    wait_quiet,
)

HEADER = struct.Struct(">BBI")
"""The dspex-trio frame header (``bridge_child.wire.HEADER``): magic, version, body length."""
MAGIC, VERSION = 0xD5, 1
CALLERS = 64
"""Concurrent callers in the throughput scenario."""
READ_CHUNK = 256 * 1024

# The blocking child of the raw-pipe and Trio-pipe rows: reads frames (the 6-byte header + a msgpack body
# [id, method, params]) from stdin and answers each with one frame [id, params["value"]], every reply of
# one read in one write. Exits on EOF.
RAW_CHILD_SRC = r"""
import os, struct, msgspec
H = struct.Struct(">BBI")
enc = msgspec.msgpack.Encoder().encode
dec = msgspec.msgpack.Decoder().decode
buf = bytearray()
while True:
    data = os.read(0, 262144)
    if not data:
        break
    buf += data
    out = []
    off = 0
    while len(buf) - off >= 6:
        magic, version, n = H.unpack_from(buf, off)
        if len(buf) - off - 6 < n:
            break
        cid, method, params = dec(bytes(buf[off + 6 : off + 6 + n]))
        off += 6 + n
        body = enc([cid, params["value"]])
        out.append(H.pack(magic, version, len(body)) + body)
    del buf[:off]
    if out:
        data = b"".join(out)
        while data:
            data = data[os.write(1, data):]
"""


def identity(x: Any) -> Any:
    """The remote function of the trio_parallel and anyio rows."""
    return x


# -- the frames of the raw rows ------------------------------------------------------------------------
_ENC = msgspec.msgpack.Encoder().encode
_DEC = msgspec.msgpack.Decoder().decode


def raw_frame(call_id: int, value: Any) -> bytes:
    body = _ENC([call_id, "echo", {"value": value}])
    return HEADER.pack(MAGIC, VERSION, len(body)) + body


def pop_reply(buf: bytearray) -> Any:
    """The next complete reply ``[id, value]`` in ``buf`` (consumed), or None."""
    if len(buf) < HEADER.size:
        return None
    _magic, _version, n = HEADER.unpack_from(buf, 0)
    end = HEADER.size + n
    if len(buf) < end:
        return None
    reply = _DEC(bytes(buf[HEADER.size : end]))
    del buf[:end]
    return reply


def raw_child_argv() -> list[str]:
    return [sys.executable, "-c", RAW_CHILD_SRC]


def stop_popen(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


# -- (a) round trip: each returns the per-call latencies of the timed calls, in ns ---------------------
def rt_raw_pipe(warmup: int, n: int) -> list[int]:
    """Blocking parent, blocking child: write one frame, read until its reply is complete."""
    proc = subprocess.Popen(raw_child_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    buf = bytearray()
    write, read, pc = os.write, os.read, time.perf_counter_ns

    def call(i: int) -> Any:
        frame = raw_frame(i, i)
        while frame:
            frame = frame[write(wfd, frame) :]
        while (reply := pop_reply(buf)) is None:
            data = read(rfd, READ_CHUNK)
            if not data:
                raise EOFError("raw child exited")
            buf.extend(data)
        return reply[1]

    try:
        for i in range(warmup):
            check(call(i), i)
        gc.collect()
        out = []
        for i in range(n):
            t0 = pc()
            value = call(i)
            out.append(pc() - t0)
            check(value, i)
        return out
    finally:
        stop_popen(proc)


async def rt_trio_pipe(warmup: int, n: int) -> list[int]:
    """A Trio parent doing the raw ping-pong in one task (``trio.lowlevel.open_process``)."""
    import trio

    proc = await trio.lowlevel.open_process(raw_child_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    buf = bytearray()

    async def call(i: int) -> Any:
        await stdin.send_all(raw_frame(i, i))
        while (reply := pop_reply(buf)) is None:
            data = await stdout.receive_some(READ_CHUNK)
            if not data:
                raise EOFError("raw child exited")
            buf.extend(data)
        return reply[1]

    try:
        return await timed_calls(call, range(warmup), range(n))
    finally:
        await close_child(proc, stdin, stdout)


def bridge_child_argv() -> list[str]:
    return [sys.executable, "-m", "bridge_child", "--diagnostics", "--worker-id", "bench"]


def rt_raw_bridge_child(warmup: int, n: int) -> list[int]:
    """Blocking parent, the real worker (``python -m bridge_child``), the real codec
    (``wire.encode_frame`` out, ``wire.Connection`` in): the floor of open_worker's design."""
    from bridge_child import wire

    proc = subprocess.Popen(
        bridge_child_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    conn = wire.Connection(wire.Role.PARENT)
    write, read, pc = os.write, os.read, time.perf_counter_ns

    def next_message() -> Any:
        while (message := conn.next_event()) is wire.NEED_DATA:
            data = read(rfd, READ_CHUNK)
            if not data:
                raise EOFError("bridge_child exited")
            conn.receive_data(data)
        return message

    def call(i: int) -> Any:
        frame = conn.send(wire.Call(i, "echo", {"value": i}))
        while frame:
            frame = frame[write(wfd, frame) :]
        while not isinstance(message := next_message(), wire.Result):
            pass
        return message.value

    try:
        assert isinstance(next_message(), wire.Hello)
        for i in range(1, warmup + 1):
            check(call(i), i)
        gc.collect()
        out = []
        for i in range(warmup + 1, warmup + n + 1):
            t0 = pc()
            value = call(i)
            out.append(pc() - t0)
            check(value, i)
        return out
    finally:
        stop_popen(proc)


async def rt_trio_bridge_child(warmup: int, n: int) -> list[int]:
    """A Trio parent in one task (no writer/reader tasks) with the real worker and codec."""
    import trio

    from bridge_child import wire

    proc = await trio.lowlevel.open_process(
        bridge_child_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout
    conn = wire.Connection(wire.Role.PARENT)

    async def next_message() -> Any:
        while (message := conn.next_event()) is wire.NEED_DATA:
            data = await stdout.receive_some(READ_CHUNK)
            if not data:
                raise EOFError("bridge_child exited")
            conn.receive_data(data)
        return message

    async def call(i: int) -> Any:
        await stdin.send_all(conn.send(wire.Call(i, "echo", {"value": i})))
        while not isinstance(message := await next_message(), wire.Result):
            pass
        return message.value

    try:
        assert isinstance(await next_message(), wire.Hello)
        return await timed_calls(call, range(1, warmup + 1), range(warmup + 1, warmup + n + 1))
    finally:
        await close_child(proc, stdin, stdout)


async def rt_open_worker(warmup: int, n: int) -> list[int]:
    """``dspex_trio.open_worker(diagnostics=True)`` then ``await worker.call("echo", {"value": i})``."""
    import dspex_trio

    pc = time.perf_counter_ns
    async with dspex_trio.open_worker(diagnostics=True) as worker:
        _FACTS["open_worker_child_affinity"] = sorted(os.sched_getaffinity(worker.pid))
        call = worker.call
        for i in range(warmup):
            check(await call("echo", {"value": i}), i)
        gc.collect()
        out = []
        for i in range(n):
            t0 = pc()
            value = await call("echo", {"value": i})
            out.append(pc() - t0)
            check(value, i)
        return out


async def rt_trio_parallel(warmup: int, n: int) -> list[int]:
    """``ctx.run_sync(identity, i)`` in a ``trio_parallel.open_worker_context()`` (spawn), limiter of 1."""
    import trio
    import trio_parallel

    pc = time.perf_counter_ns
    limiter = trio.CapacityLimiter(1)
    async with trio_parallel.open_worker_context(worker_type=trio_parallel.WorkerType.SPAWN) as ctx:
        run = ctx.run_sync
        for i in range(warmup):
            check(await run(identity, i, limiter=limiter), i)
        gc.collect()
        out = []
        for i in range(n):
            t0 = pc()
            value = await run(identity, i, limiter=limiter)
            out.append(pc() - t0)
            check(value, i)
        return out


async def rt_anyio(warmup: int, n: int) -> list[int]:
    """``anyio.to_process.run_sync(identity, i)`` with a limiter of 1 (under whichever backend runs it)."""
    import anyio
    import anyio.to_process

    pc = time.perf_counter_ns
    limiter = anyio.CapacityLimiter(1)
    run = anyio.to_process.run_sync
    for i in range(warmup):
        check(await run(identity, i, limiter=limiter), i)
    gc.collect()
    out = []
    for i in range(n):
        t0 = pc()
        value = await run(identity, i, limiter=limiter)
        out.append(pc() - t0)
        check(value, i)
    return out


# -- (b) throughput: each returns calls/s of `total` calls from CALLERS concurrent callers -------------
def tp_raw_pipelined(warmup: int, total: int) -> float:
    """Blocking parent, one worker: write CALLERS frames in one write, read the CALLERS replies, repeat."""
    proc = subprocess.Popen(raw_child_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdin is not None and proc.stdout is not None
    wfd, rfd = proc.stdin.fileno(), proc.stdout.fileno()
    buf = bytearray()

    def batch(start: int) -> None:
        data = b"".join([raw_frame(i, i) for i in range(start, start + CALLERS)])
        while data:
            data = data[os.write(wfd, data) :]
        for i in range(start, start + CALLERS):
            while (reply := pop_reply(buf)) is None:
                chunk = os.read(rfd, READ_CHUNK)
                if not chunk:
                    raise EOFError("raw child exited")
                buf.extend(chunk)
            check(reply[1], i)

    try:
        for b in range(max(1, warmup // CALLERS)):
            batch(b * CALLERS)
        gc.collect()
        batches = max(1, total // CALLERS)
        t0 = time.perf_counter()
        for b in range(batches):
            batch(b * CALLERS)
        return batches * CALLERS / (time.perf_counter() - t0)
    finally:
        stop_popen(proc)


async def _callers(call: Callable[[int], Any], warmup: int, total: int) -> float:
    """Run ``call`` from CALLERS tasks (``total`` calls in all, after ``warmup``); calls/s."""
    import anyio

    per_task = max(1, total // CALLERS)

    async def caller(k: int, count: int) -> None:
        for j in range(count):
            value = k * 1_000_000 + j
            check(await call(value), value)

    if warmup:
        async with anyio.create_task_group() as tg:
            for k in range(CALLERS):
                tg.start_soon(caller, k, max(1, warmup // CALLERS))
    gc.collect()
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for k in range(CALLERS):
            tg.start_soon(caller, k, per_task)
    return per_task * CALLERS / (time.perf_counter() - t0)


async def tp_open_worker(warmup: int, total: int) -> float:
    import dspex_trio

    async with dspex_trio.open_worker(diagnostics=True) as worker:

        async def call(value: int) -> Any:
            return await worker.call("echo", {"value": value})

        return await _callers(call, warmup, total)


def _tp_trio_parallel(workers: int | None) -> Callable[[int, int], Any]:
    async def run(warmup: int, total: int) -> float:
        import trio
        import trio_parallel

        limiter = None if workers is None else trio.CapacityLimiter(workers)
        async with trio_parallel.open_worker_context(worker_type=trio_parallel.WorkerType.SPAWN) as ctx:

            async def call(value: int) -> Any:
                return await ctx.run_sync(identity, value, limiter=limiter)

            return await _callers(call, warmup, total)

    return run


def _tp_anyio(workers: int | None) -> Callable[[int, int], Any]:
    async def run(warmup: int, total: int) -> float:
        import anyio
        import anyio.to_process

        limiter = None if workers is None else anyio.CapacityLimiter(workers)

        async def call(value: int) -> Any:
            return await anyio.to_process.run_sync(identity, value, limiter=limiter)

        return await _callers(call, warmup, total)

    return run


# -- the implementations -------------------------------------------------------------------------------
# name -> (function, how it runs: "sync" | "trio" | "asyncio", description)
DEFAULT_WORKERS = os.cpu_count() or 1
ROUND_TRIP: dict[str, tuple[Callable[..., Any], str, str]] = {
    "raw_pipe": (rt_raw_pipe, "sync", "blocking parent + blocking child (Popen), 6-byte header + msgpack"),
    "trio_pipe": (rt_trio_pipe, "trio", "Trio parent, one task, trio.lowlevel.open_process, same child"),
    "raw_bridge_child": (rt_raw_bridge_child, "sync", "blocking parent + the real bridge_child and codec"),
    "trio_bridge_child": (rt_trio_bridge_child, "trio", "Trio parent, one task, the real bridge_child"),
    "open_worker": (rt_open_worker, "trio", 'dspex_trio.open_worker(diagnostics=True).call("echo")'),
    "trio_parallel": (rt_trio_parallel, "trio", "trio_parallel worker context (spawn), limiter 1"),
    "anyio_trio": (rt_anyio, "trio", "anyio.to_process.run_sync, trio backend, limiter 1"),
    "anyio_asyncio": (rt_anyio, "asyncio", "anyio.to_process.run_sync, asyncio backend, limiter 1"),
}
THROUGHPUT: dict[str, tuple[Callable[..., Any], str, str]] = {
    "raw_pipelined": (tp_raw_pipelined, "sync", f"blocking parent, batches of {CALLERS} frames, 1 worker"),
    "open_worker": (tp_open_worker, "trio", f"{CALLERS} tasks on ONE open_worker (multiplexed)"),
    "trio_parallel": (
        _tp_trio_parallel(None),
        "trio",
        f"trio_parallel default limiter ({DEFAULT_WORKERS} workers)",
    ),
    "trio_parallel_1w": (_tp_trio_parallel(1), "trio", "trio_parallel, limiter 1 (one worker)"),
    "anyio_trio": (_tp_anyio(None), "trio", f"anyio.to_process, trio backend, default ({DEFAULT_WORKERS} w)"),
    "anyio_trio_1w": (_tp_anyio(1), "trio", "anyio.to_process, trio backend, limiter 1"),
    "anyio_asyncio": (
        _tp_anyio(None),
        "asyncio",
        f"anyio.to_process, asyncio backend, default ({DEFAULT_WORKERS} w)",
    ),
}
ANCHORS = {"round_trip": "raw_pipe", "throughput": "raw_pipelined"}
"""Every row's ratio is to the floor (round trip) or the ceiling (throughput)."""

_FACTS: dict[str, Any] = {}
"""Facts recorded by a measuring subprocess (e.g. the worker's CPU affinity)."""


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """The body of one measuring subprocess: one round of one scenario."""
    os.sched_setaffinity(0, set(spec["cpus"]))  # before any thread or worker exists: all inherit it
    asyncio_log = CountUnknownChild()
    logging.getLogger("asyncio").addFilter(asyncio_log)
    results: dict[str, Any] = {}
    table = ROUND_TRIP if spec["scenario"] == "round_trip" else THROUGHPUT
    for name in spec["implementations"]:
        fn, how, _ = table[name]
        t0 = time.perf_counter()
        try:
            if spec["scenario"] == "round_trip":
                ns = run_one(fn, how, spec["warmup"], spec["n"], time_limit=spec["time_limit"])
                results[name] = summarize_latencies(ns)
            else:
                results[name] = {
                    "calls_per_s": run_one(fn, how, spec["warmup"], spec["n"], time_limit=spec["time_limit"])
                }
        except Exception as exc:  # reported, the other implementations still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = time.perf_counter() - t0
    _FACTS["asyncio_unknown_child_warnings"] = asyncio_log.count
    _FACTS["code_under_test"] = code_under_test()
    _FACTS["imported_from"] = _common.imported_from()
    return {"results": results, "facts": _FACTS, "affinity": sorted(os.sched_getaffinity(0))}


# -- the driver ----------------------------------------------------------------------------------------
def run_round(spec: dict[str, Any], tag: str, timeout: float, tree: str) -> dict[str, Any]:
    return _common.run_measure("benchmarks.roundtrip", spec, tag, timeout, tree)


def run_profile(
    cpu: int, tag: str, tree: str, errors: list[str], leftovers: list[int]
) -> dict[str, Any] | None:
    """``--profile`` in a tagged subprocess (pinned to ``cpu``); its summary, or None."""
    env = child_env(tag, tree)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        argv = [
            sys.executable,
            "-m",
            "benchmarks.roundtrip",
            "--profile",
            "--cpu",
            str(cpu),
            "--json",
            out.name,
        ]
        profile: dict[str, Any] | None = None
        try:
            subprocess.run(argv, env=env, timeout=240, check=True, stdout=subprocess.DEVNULL, cwd=tree)
            profile = json.load(out)
        except (subprocess.SubprocessError, ValueError) as exc:
            errors.append(f"profile: {exc}")
    leftovers += reap_leftovers(tag)
    return profile


def driver(args: argparse.Namespace) -> int:
    """Snapshot the code, run the rounds against the snapshot, report; the snapshot is removed."""
    tree = snapshot_tree() if not args.live_tree else ROOT
    try:
        return drive(args, tree, code_under_test(tree))
    finally:
        if tree != ROOT:
            shutil.rmtree(tree, ignore_errors=True)


def drive(args: argparse.Namespace, tree: str, code: dict[str, Any]) -> int:
    quick = args.quick
    rounds = args.rounds or (3 if quick else 5)
    n_rt = args.n or (2_000 if quick else 5_000)
    n_tp = args.calls or (12_800 if quick else 32_000)
    warmup = 200
    budget = args.budget or (80.0 if quick else 600.0)
    all_cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else all_cpus[-1]
    if cpu not in all_cpus:
        raise SystemExit(f"--cpu {cpu} is not allowed here (allowed: {all_cpus})")
    tag = uuid.uuid4().hex
    started = time.monotonic()
    deadline = started + budget
    rt_names, tp_names = list(ROUND_TRIP), list(THROUGHPUT)
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    errors: list[str] = []
    leftovers: list[int] = []
    rounds_done = {"round_trip": 0, "throughput": 0}
    child_affinity: list[int] | None = None
    asyncio_warnings = 0
    busy_before: list[float] = []
    code_seen: set[str] = set()
    imported_from: dict[str, str] = {}
    # Estimated seconds of one round, to stop starting rounds that would overrun the budget.
    estimate = {"round_trip": 8.0 if quick else 20.0, "throughput": 15.0 if quick else 40.0}
    for r in range(rounds):
        for scenario, names, n, cpus in (
            ("round_trip", rt_names, n_rt, [cpu]),
            ("throughput", tp_names, n_tp, all_cpus),
        ):
            remaining = deadline - time.monotonic()
            if r > 0 and remaining < estimate[scenario] * 1.3:
                errors.append(f"{scenario}: round {r + 1} skipped (time budget)")
                continue
            spec = {
                "scenario": scenario,
                "implementations": rotate(names, r),
                "warmup": warmup,
                "n": n,
                "cpus": cpus,
                "time_limit": 30.0 if quick else 120.0,
            }
            busy = wait_quiet(
                min(args.wait_quiet, max(0.0, deadline - time.monotonic() - estimate[scenario]))
            )
            busy_before.append(round(busy, 2))
            t0 = time.monotonic()
            print(
                f"round {r + 1}/{rounds} {scenario} (machine {busy:.0%} busy) ...",
                file=sys.stderr,
                flush=True,
            )
            # The hard bound of a round: the budget's end plus a little (a quick run stays under 90 s).
            result = run_round(spec, tag, max(5.0, deadline + 5.0 - time.monotonic()), tree)
            estimate[scenario] = max(estimate[scenario] * 0.5, time.monotonic() - t0)
            leftovers += result.get("leftovers", [])
            if "error" in result:
                errors.append(f"{scenario} round {r + 1}: {result['error']}")
                continue
            rounds_done[scenario] += 1
            asyncio_warnings += result["facts"].get("asyncio_unknown_child_warnings", 0)
            code_seen.add(
                json.dumps(result["facts"].get("code_under_test", {}).get("sha256_12"), sort_keys=True)
            )
            imported_from = result["facts"].get("imported_from", imported_from)
            if scenario == "round_trip":
                child_affinity = result["facts"].get("open_worker_child_affinity", child_affinity)
            for name, res in result["results"].items():
                if "error" in res:
                    errors.append(f"{scenario}/{name} round {r + 1}: {res['error']}")
                else:
                    samples.setdefault((scenario, name), []).append(res)
    if len(code_seen) > 1:
        errors.append(f"the code under test changed during the run ({len(code_seen)} versions): re-run")
    report = build_report(samples, rt_names, tp_names)
    rt_target = next(
        (t for t in report["targets"] if t["kind"] == "target" and t["scenario"] == "round_trip"), None
    )
    want_profile = args.with_profile or (not quick and rt_target is not None and not rt_target["met"])
    if want_profile and time.monotonic() < deadline:
        print("profile of open_worker's round trip ...", file=sys.stderr, flush=True)
        report["profile"] = run_profile(cpu, tag, tree, errors, leftovers)
    leftovers += reap_leftovers(tag)
    facts = machine_facts(cpu, all_cpus)
    facts["open_worker_child_affinity_when_pinned"] = child_affinity
    facts["code_under_test"] = {**code, "imported_from": imported_from}
    run_info = {
        "mode": "quick" if quick else "full",
        "rounds": rounds_done,
        "warmup_calls": warmup,
        "round_trip_calls_per_round": n_rt,
        "throughput_calls_per_round": n_tp,
        "callers": CALLERS,
        "seconds": round(time.monotonic() - started, 1),
        "leftover_processes": sorted(set(leftovers)),
        "asyncio_unknown_child_warnings": asyncio_warnings,
        "machine_busy_before_rounds": busy_before,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "errors": errors,
    }
    print_report(report, facts, run_info)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "run": run_info, **report}, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 1 if errors or leftovers else 0


def build_report(
    samples: dict[tuple[str, str], list[dict[str, Any]]], rt_names: list[str], tp_names: list[str]
) -> dict[str, Any]:
    values: dict[tuple[str, str, str], float] = {}
    spread: dict[tuple[str, str, str], list[float]] = {}
    for (scenario, name), runs in samples.items():
        metrics = ("median", "p99") if scenario == "round_trip" else ("calls_per_s",)
        for metric in metrics:
            xs = [run[metric] for run in runs]
            values[(scenario, name, metric)] = statistics.median(xs)
            spread[(scenario, name, metric)] = xs
    rows = []
    for scenario, names, metrics, unit in (
        ("round_trip", rt_names, ("median", "p99"), "us"),
        ("throughput", tp_names, ("calls_per_s",), "calls/s"),
    ):
        anchor = ANCHORS[scenario]
        for name in names:
            for metric in metrics:
                value = values.get((scenario, name, metric))
                if value is None:
                    continue
                base = values.get((scenario, anchor, metric))
                rows.append(
                    {
                        "scenario": scenario,
                        "implementation": name,
                        "metric": metric,
                        "value": round(value, 1),
                        "unit": unit,
                        "ratio_to": anchor,
                        "ratio": round(value / base, 3) if base else None,
                        "runs": [round(x, 1) for x in spread[(scenario, name, metric)]],
                        "description": (ROUND_TRIP if scenario == "round_trip" else THROUGHPUT)[name][2],
                    }
                )
    targets = []
    for scenario, metric, other, op, target, kind in (
        ("round_trip", "median", "trio_parallel", "<=", 0.8, "target"),
        ("round_trip", "median", "anyio_trio", "<=", 1.0, "stretch"),
        ("round_trip", "median", "anyio_asyncio", "<=", 1.0, "stretch"),
        ("round_trip", "p99", "trio_parallel", "<=", 0.8, "info"),
        ("throughput", "calls_per_s", "trio_parallel", ">=", 2.5, "target"),
        ("throughput", "calls_per_s", "trio_parallel_1w", ">=", 2.5, "info"),
        ("throughput", "calls_per_s", "anyio_trio", ">=", 1.0, "info"),
    ):
        mine, theirs = values.get((scenario, "open_worker", metric)), values.get((scenario, other, metric))
        if mine is None or not theirs:
            continue
        ratio = mine / theirs
        targets.append(
            {
                "scenario": scenario,
                "implementation": "open_worker",
                "metric": metric,
                "value": round(mine, 1),
                "unit": "us" if scenario == "round_trip" else "calls/s",
                "ratio_to": other,
                "ratio": round(ratio, 3),
                "target": f"{op} {target}",
                "kind": kind,
                "met": ratio <= target if op == "<=" else ratio >= target,
            }
        )
    return {"rows": rows, "targets": targets}


def print_report(report: dict[str, Any], facts: dict[str, Any], run: dict[str, Any]) -> None:
    v = facts["versions"]
    print(
        f"\n{facts['cpu_model']}, {facts['cores']} cores; Python {facts['python']}; trio {v['trio']}, "
        f"trio-parallel {v['trio-parallel']}, anyio {v['anyio']}, msgspec {v['msgspec']}"
    )
    print(
        f"mode {run['mode']}: rounds {run['rounds']}, warm-up {run['warmup_calls']}, "
        f"{run['round_trip_calls_per_round']} timed round trips and {run['throughput_calls_per_round']} "
        f"throughput calls per round; {run['seconds']} s"
    )
    print(f"\n(a) round trip, 1 caller, 1 worker, pinned to CPU {facts['pinned_cpu']} (us; x raw_pipe)")
    print(f"{'implementation':<16} {'median':>9} {'p99':>9} {'x floor':>8}  description")
    rows = report["rows"]
    by = {(r["scenario"], r["implementation"], r["metric"]): r for r in rows}
    for name, (_, _, desc) in ROUND_TRIP.items():
        med, p99 = by.get(("round_trip", name, "median")), by.get(("round_trip", name, "p99"))
        if med is None or p99 is None:
            print(f"{name:<16} {'-':>9} {'-':>9} {'-':>8}  {desc}")
            continue
        print(f"{name:<16} {med['value']:>9.1f} {p99['value']:>9.1f} {med['ratio'] or 0:>7.2f}x  {desc}")
    print(f"\n(b) throughput, {CALLERS} callers, unpinned (calls/s; x raw_pipelined)")
    print(f"{'implementation':<16} {'calls/s':>9} {'x ceil':>8}  description")
    for name, (_, _, desc) in THROUGHPUT.items():
        row = by.get(("throughput", name, "calls_per_s"))
        if row is None:
            print(f"{name:<16} {'-':>9} {'-':>8}  {desc}")
            continue
        print(f"{name:<16} {row['value']:>9.0f} {row['ratio'] or 0:>7.3f}x  {desc}")
    print("\ntargets (open_worker vs ...)")
    for t in report["targets"]:
        verdict = ("MET" if t["met"] else "MISSED") if t["kind"] != "info" else ("yes" if t["met"] else "no")
        print(
            f"  {t['scenario']:<10} {t['metric']:<11} vs {t['ratio_to']:<16} {t['ratio']:>6.2f}x  "
            f"({t['kind']} {t['target']}): {verdict}"
        )
    profile = report.get("profile")
    if profile:
        print(f"\nprofile of open_worker's round trip (pinned, median us of {profile['repeats']} runs)")
        print("  floors:   " + ", ".join(f"{k} {v}" for k, v in profile["floors_us"].items()))
        print(
            f"  phases (instrumented total {profile['instrumented_total_us']}; of the calls that went"
            f" through the writer and reader tasks, not the {profile['direct_calls']} direct ones):"
        )
        print("    " + ", ".join(f"{k} {v}" for k, v in profile["phases_median_us"].items()))
        print("  what-if variants, round trip us:")
        for k, v in profile["variants_median_us"].items():
            print(f"    {k:<36} {v:>7}")
        print(f"  what-if variants, throughput calls/s ({CALLERS} callers, unpinned):")
        for k, v in profile["throughput_calls_per_s (unpinned, 64 callers)"].items():
            print(f"    {k:<36} {v:>7.0f}")
        print(
            f"  trio: task hop there and back {profile['trio_task_hop_there_and_back_us']}, checkpoint "
            f"{profile['trio_checkpoint_us']}, move_on_at + set-event wait "
            f"{profile['trio_move_on_at+set_event_wait_us']}"
        )
    if run["errors"]:
        print("\nerrors:\n  " + "\n  ".join(run["errors"]))
    print(f"leftover processes: {run['leftover_processes'] or 'none'}")
    busy = run["machine_busy_before_rounds"]
    if busy and max(busy) > 0.25:
        print(
            f"WARNING: other load on the machine before some rounds (busy fractions {busy}); "
            "figures are noisy, compare ratios only, or re-run (--wait-quiet)"
        )
    if run["asyncio_unknown_child_warnings"]:
        print(
            f'asyncio "Unknown child process" warnings (anyio asyncio-backend teardown race; hidden, '
            f"no process left): {run['asyncio_unknown_child_warnings']}"
        )


# -- profile: where does open_worker's round trip go? ---------------------------------------------------
PHASES = ("submit->write", "write", "write->read", "read->decoded", "decoded->caller")


def call_variants(worker: Any) -> dict[str, Callable[[int], Any]]:
    """What-if versions of ``worker.call("echo", {"value": i})`` built from the handle's own parts
    (experiments, not a drop-in implementation).

    - ``no_cancel_scope``: ``_submit``, then one ``await call.done.wait()`` (no per-call cancel scope;
      the same as ``as_is`` once the handle needs no scope for a call without a timeout).
    - ``sync_write_*``: the caller writes its frame itself (``os.write`` on the non-blocking pipe) instead
      of waking the writer task; ``_always``: every call; ``_if_alone``: only when no other call is in
      flight and nothing is queued (else queued for the writer task, as now).
    """
    import trio

    fd = worker.process.stdin.fileno()
    send_lock = getattr(worker, "_send_lock", None)

    def submit_direct(i: int, *, only_if_alone: bool) -> Any:
        """``Worker._submit``, then the caller writes the frame itself if nothing else is queued or being
        sent (else, or if the pipe is full, the writer task takes it, as now)."""
        if only_if_alone and worker._calls:
            return worker._submit("echo", {"value": i}, timeout=None, flags=0)
        wakeup = worker._writer_wakeup
        worker._writer_wakeup = trio.Event()  # _submit's wake-up goes to a dummy event
        try:
            call = worker._submit("echo", {"value": i}, timeout=None, flags=0)
        finally:
            worker._writer_wakeup = wakeup
        if len(worker._outbox) == 1 and not (send_lock is not None and send_lock.locked()):
            frame = worker._outbox.pop()
            try:
                sent = os.write(fd, frame)
            except BlockingIOError:
                sent = 0
            if sent < len(frame):
                worker._outbox.append(frame[sent:])
                wakeup.set()
        else:
            wakeup.set()
        return call

    async def wait_done(call: Any) -> Any:
        await call.done.wait()
        return call.result.unwrap()

    async def as_is(i: int) -> Any:
        return await worker.call("echo", {"value": i})

    async def no_cancel_scope(i: int) -> Any:
        return await wait_done(worker._submit("echo", {"value": i}, timeout=None, flags=0))

    async def sync_write_always(i: int) -> Any:
        return await worker._wait(submit_direct(i, only_if_alone=False))

    async def sync_write_if_alone(i: int) -> Any:
        return await worker._wait(submit_direct(i, only_if_alone=True))

    async def sync_write_if_alone_no_scope(i: int) -> Any:
        return await wait_done(submit_direct(i, only_if_alone=True))

    return {
        "as_is": as_is,
        "no_cancel_scope": no_cancel_scope,
        "sync_write_always": sync_write_always,
        "sync_write_if_alone": sync_write_if_alone,
        "sync_write_if_alone+no_cancel_scope": sync_write_if_alone_no_scope,
    }


async def profile_throughput(warmup: int, total: int, blocks: int = 5) -> dict[str, float]:
    """calls/s of ``CALLERS`` concurrent callers on one worker for each variant, interleaved by block."""
    import trio

    import dspex_trio

    async with dspex_trio.open_worker(diagnostics=True, heartbeat_interval=3600.0) as worker:
        variants = call_variants(worker)
        for name, fn in list(variants.items()):
            try:
                await _callers(fn, warmup, warmup)
            except Exception:  # reported by the round-trip part
                del variants[name]
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(blocks):
            for name, fn in variants.items():
                results[name].append(await _callers(fn, 0, max(CALLERS, total // blocks)))
        await trio.lowlevel.checkpoint()
    return {name: statistics.median(xs) for name, xs in results.items()}


async def profile_open_worker(warmup: int, n: int, blocks: int = 10) -> dict[str, Any]:
    """Timestamps along one echo round trip, then what-if variants of the call path built from the worker
    handle's own parts, interleaved block by block (experiments, not a proposed implementation)."""
    import trio

    import dspex_trio
    from bridge_child import wire

    pc = time.perf_counter_ns
    marks: dict[str, int] = {}

    class Timed:
        """Wraps the worker's stdin (send_all), its frame stream (receive_some) and its connection
        (next_event) to mark when the write starts and ends, the read returns, the Result is decoded."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def send_all(self, data: bytes) -> None:
            marks.setdefault("write_start", pc())
            await self.inner.send_all(data)
            marks.setdefault("write_done", pc())

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            data: bytes = await self.inner.receive_some(max_bytes)
            marks.setdefault("read_done", pc())
            return data

        def next_event(self) -> Any:
            message = self.inner.next_event()
            if isinstance(message, wire.Result):
                marks.setdefault("decoded", pc())
            return message

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    out: dict[str, Any] = {}
    async with dspex_trio.open_worker(diagnostics=True, heartbeat_interval=3600.0) as worker:
        proc = worker.process.process  # type: ignore[attr-defined]
        conn = worker._conn
        proc.stdin, proc.stdout = Timed(proc.stdin), Timed(proc.stdout)
        worker._conn = Timed(conn)  # type: ignore[assignment]
        for i in range(warmup):
            await worker.call("echo", {"value": i})
        gc.collect()
        phases: dict[str, list[int]] = {k: [] for k in PHASES}
        total = []
        direct = 0  # calls that bypassed the writer or reader task (the lone caller's direct write/read)
        for i in range(n):
            marks.clear()
            t0 = pc()
            await worker.call("echo", {"value": i})
            t5 = pc()
            total.append(t5 - t0)
            if not {"write_start", "write_done", "read_done", "decoded"} <= marks.keys():
                direct += 1  # the caller wrote its frame or read its reply itself: no task phases
                continue
            phases["submit->write"].append(marks["write_start"] - t0)
            phases["write"].append(marks["write_done"] - marks["write_start"])
            phases["write->read"].append(marks["read_done"] - marks["write_done"])
            phases["read->decoded"].append(marks["decoded"] - marks["read_done"])
            phases["decoded->caller"].append(t5 - marks["decoded"])
        out["instrumented_total_us"] = statistics.median(total) / 1000
        out["direct_calls"] = direct
        out["phases_median_us"] = {k: statistics.median(v) / 1000 for k, v in phases.items() if v}
        proc.stdin, proc.stdout, worker._conn = proc.stdin.inner, proc.stdout.inner, conn
        await worker.call("echo", {"value": 0})  # the reader's next receive_some is on the plain stream

        variants = call_variants(worker)
        for name, fn in list(variants.items()):
            try:
                for i in range(warmup):
                    check(await fn(i), i)
            except Exception as exc:  # the handle changed under the experiment: skip the variant
                out.setdefault("variant_errors", {})[name] = f"{type(exc).__name__}: {exc}"
                del variants[name]
        gc.collect()
        lat: dict[str, list[int]] = {name: [] for name in variants}
        per_block = max(1, n // blocks)
        for _ in range(blocks):
            for name, fn in variants.items():
                xs = lat[name]
                for i in range(per_block):
                    t0 = pc()
                    value = await fn(i)
                    xs.append(pc() - t0)
                    check(value, i)
        out["variants_median_us"] = {name: statistics.median(xs) / 1000 for name, xs in lat.items()}

    ev_a, ev_b = [trio.Event()], [trio.Event()]

    async def ponger() -> None:
        while True:
            await ev_a[0].wait()
            ev_a[0] = trio.Event()
            ev_b[0].set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ponger)
        await trio.lowlevel.checkpoint()
        xs = []
        for _ in range(n):
            t0 = pc()
            ev_a[0].set()
            await ev_b[0].wait()
            ev_b[0] = trio.Event()
            xs.append(pc() - t0)
        out["trio_task_hop_there_and_back_us"] = statistics.median(xs) / 1000
        xs = []
        for _ in range(n):
            t0 = pc()
            await trio.lowlevel.checkpoint()
            xs.append(pc() - t0)
        out["trio_checkpoint_us"] = statistics.median(xs) / 1000
        done = trio.Event()
        done.set()
        xs = []
        for _ in range(n):
            t0 = pc()
            with trio.move_on_at(trio.current_time() + 5.0):
                await done.wait()
            xs.append(pc() - t0)
        out["trio_move_on_at+set_event_wait_us"] = statistics.median(xs) / 1000
        nursery.cancel_scope.cancel()
    return out


def profile_main(args: argparse.Namespace) -> int:
    """``--profile``: pinned like (a); open_worker's phases and variants, beside the floors."""
    import trio

    all_cpus = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else all_cpus[-1]
    os.sched_setaffinity(0, {cpu})
    n = args.n or 2_000
    repeats = args.rounds or 3
    runs = []
    for _ in range(repeats):

        async def bounded() -> dict[str, Any]:
            with trio.fail_after(120):
                return await profile_open_worker(200, n)

        run = trio.run(bounded)
        run["floors_us"] = {
            "raw_pipe": summarize_latencies(rt_raw_pipe(200, n))["median"],
            "raw_bridge_child": summarize_latencies(rt_raw_bridge_child(200, n))["median"],
            "trio_pipe": summarize_latencies(trio.run(rt_trio_pipe, 200, n))["median"],
            "trio_bridge_child": summarize_latencies(trio.run(rt_trio_bridge_child, 200, n))["median"],
        }
        runs.append(run)

    os.sched_setaffinity(0, set(all_cpus))  # throughput unpinned, like (b)
    for run in runs:

        async def bounded_tp() -> dict[str, float]:
            with trio.fail_after(120):
                return await profile_throughput(640, args.calls or 12_800)

        run["throughput_calls_per_s"] = trio.run(bounded_tp)

    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return round(statistics.median(get(r) for r in runs), 1)

    def med_of(key: str) -> dict[str, float]:
        keys = [k for k in runs[0][key] if all(k in r[key] for r in runs)]
        return {k: round(statistics.median(r[key][k] for r in runs), 1) for k in keys}

    summary: dict[str, Any] = {
        "pinned_cpu": cpu,
        "repeats": repeats,
        "n": n,
        "floors_us": med_of("floors_us"),
        "instrumented_total_us": med(lambda r: r["instrumented_total_us"]),
        "direct_calls": med(lambda r: r["direct_calls"]),
        "phases_median_us": med_of("phases_median_us"),
        "variants_median_us": med_of("variants_median_us"),
        "throughput_calls_per_s (unpinned, 64 callers)": med_of("throughput_calls_per_s"),
        "trio_task_hop_there_and_back_us": med(lambda r: r["trio_task_hop_there_and_back_us"]),
        "trio_checkpoint_us": med(lambda r: r["trio_checkpoint_us"]),
        "trio_move_on_at+set_event_wait_us": med(lambda r: r["trio_move_on_at+set_event_wait_us"]),
        "variant_errors": {k: v for r in runs for k, v in r.get("variant_errors", {}).items()},
        "code_under_test": code_under_test(),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.roundtrip", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds (< 90 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--cpu", type=int, help="the CPU of the pinned round trips (default: the last)")
    parser.add_argument("--rounds", type=int, help="rounds (default: quick 3, full 5)")
    parser.add_argument("--n", type=int, help="timed round trips per round (default: quick 2000, full 5000)")
    parser.add_argument("--calls", type=int, help="throughput calls per round (default: 12800 / 32000)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each round, wait up to S seconds (within the budget) for other load to go",
    )
    parser.add_argument("--budget", type=float, help="seconds; no round starts past it (default: 80 / 600)")
    parser.add_argument(
        "--profile", action="store_true", help="instead: where open_worker's round trip goes (pinned)"
    )
    parser.add_argument(
        "--with-profile",
        action="store_true",
        help="also run --profile after the benchmark (a full run does when the round-trip target is missed)",
    )
    parser.add_argument(
        "--live-tree",
        action="store_true",
        help="measure the working tree as it is during the run (default: a snapshot taken at the start)",
    )
    parser.add_argument("--_measure", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        spec, path = args._measure
        result = measure(json.loads(spec))
        with open(path, "w") as f:
            json.dump(result, f)
        return 0
    if args.profile:
        return profile_main(args)
    return driver(args)


if __name__ == "__main__":
    # Run as the imported module, so `identity` pickles as `benchmarks.roundtrip.identity` (importable in
    # the trio_parallel and anyio workers) rather than as `__main__.identity`.
    from benchmarks import roundtrip

    sys.exit(roundtrip.main())
