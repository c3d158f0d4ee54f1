"""Chaos load: many mixed calls through a real pool while a worker is SIGKILLed every 200 ms.

Run with ``python -m benchmarks.chaos_load [--calls N] [--seconds S] [--workers W] [--json out.json]``
(bounded in count AND time: it stops at N calls or S seconds, whichever comes first), or ``--long`` for
the long version (100,000 calls, up to 15 minutes, plus the measurements repeated). What it checks:

- load: echo (a unique value per call), short sleeps, and DSPy ``execute`` with the embedded offline LM
  (``pool.create_program`` / ``pool.execute``); half of the echo/sleep calls are idempotent. Every call
  is bounded by a timeout (a call still running after it counts as a *hang*); every result is checked
  against its own call (*misdelivered* otherwise); every failure must be a ``DspexError`` subclass
  (*untyped* otherwise); every idempotent call must succeed. A killer SIGKILLs the oldest ready worker
  every ``--kill-interval`` s (the oldest: an idempotent call is retried once, on another worker, so
  the worker that took the retries of the previous victim is not the next one). With the default
  settings the circuit must stay closed.
- storm: workers that die as soon as they start (``fail_at_start``, and a hook that SIGKILLs every
  worker the moment it is ready) must open the circuit: after how many failures, how fast.
- measure: SIGKILL -> calls failed (ms), replacement ready (ms); SIGSTOP -> detected (s) with the
  heartbeat settings used; the figures quoted in docs/operations.md ("Measured").

The counts are printed (and written with ``--json``); the exit status is 1 if an invariant failed.
``tests/dspex_trio/test_chaos.py`` runs a short version in CI.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import os
import re
import signal
import statistics
import sys
import time
from typing import Any

import trio

import dspex_trio
from dspex_trio import CircuitState, DspexError, WorkerState

CALL_TIMEOUT_S = 10.0
"""Every call's deadline (given to the pool); a call not ended CALL_TIMEOUT_S + HANG_SLACK_S after it
started is a hang."""
HANG_SLACK_S = 5.0
MIX = ("echo", "echo", "echo", "echo", "sleep", "sleep", "execute", "execute", "echo", "sleep")
"""Kinds by call index modulo 10."""


async def _poll(predicate: Any, interval: float = 0.0005) -> None:
    """Wait until ``predicate()`` is true, checking every ``interval`` s (the figures need ms precision)."""
    while True:
        if predicate():
            return
        await trio.sleep(interval)


def _ready(pool: dspex_trio.Pool) -> list[dspex_trio.Worker]:
    return [w for w in pool.workers() if w.state in (WorkerState.READY, WorkerState.BUSY) and w.accepting]


async def _killer(pool: dspex_trio.Pool, interval: float, kills: list[float], stop: trio.Event) -> None:
    born: dict[int, int] = {}
    counter = itertools.count()
    while not stop.is_set():
        with trio.move_on_after(interval):
            await stop.wait()
        if stop.is_set():
            return
        ready = _ready(pool)
        for worker in ready:
            born.setdefault(worker.pid, next(counter))
        if not ready:
            continue
        victim = min(ready, key=lambda w: born[w.pid])
        try:
            os.kill(victim.pid, signal.SIGKILL)
            kills.append(time.monotonic())
        except ProcessLookupError:
            pass


async def run_load(
    calls: int = 100_000,
    seconds: float = 120.0,
    *,
    workers: int = 2,
    kill_interval: float = 0.2,
    concurrency: int = 64,
    launcher: str = "auto",
    **pool_options: Any,
) -> dict[str, Any]:
    """The load phase: returns the counts (see the module doc)."""
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    samples: list[str] = []
    kills: list[float] = []
    next_index = itertools.count()
    start = time.monotonic()
    end = start + seconds

    async with dspex_trio.open_pool(
        workers=workers, diagnostics=True, launcher=launcher, **pool_options
    ) as pool:
        program = await pool.create_program("question -> answer", session="chaos", timeout=CALL_TIMEOUT_S)

        async def one(index: int) -> None:
            kind = MIX[index % len(MIX)]
            idempotent = kind != "execute" and index % 2 == 0
            counts[f"{kind}{'/idempotent' if idempotent else ''}"] += 1
            outcome = "hang"
            with trio.move_on_after(CALL_TIMEOUT_S + HANG_SLACK_S):
                try:
                    if kind == "echo":
                        value = {"i": index, "s": f"v{index}"}
                        got = await pool.call(
                            "echo", {"value": value}, timeout=CALL_TIMEOUT_S, idempotent=idempotent
                        )
                        ok = got == value
                    elif kind == "sleep":
                        seconds_ = round(0.001 + (index % 20) * 0.001 + index * 1e-9, 9)
                        got = await pool.call(
                            "sleep", {"seconds": seconds_}, timeout=CALL_TIMEOUT_S, idempotent=idempotent
                        )
                        ok = got == seconds_
                    else:
                        question = f"question {index}"
                        got = await pool.execute(
                            program, {"question": question}, session="chaos", timeout=CALL_TIMEOUT_S
                        )
                        ok = (
                            isinstance(got, dict)
                            and set(got) == {"answer"}
                            and isinstance(got["answer"], str)
                        )
                    outcome = "ok" if ok else "misdelivered"
                    if not ok and len(samples) < 5:
                        samples.append(f"{kind} {index}: got {got!r}"[:300])
                except DspexError as exc:
                    outcome = "failed"
                    errors[type(exc).__name__] += 1
                    if idempotent and exc.attempts < 2:  # failed without its retry elsewhere
                        counts["idempotent_failed"] += 1
                        if len(samples) < 5:
                            samples.append(f"idempotent {kind} {index}: {exc!r}"[:300])
                    elif idempotent:  # its retry, on another worker, was killed too
                        counts["idempotent_failed_twice"] += 1
                except Exception as exc:
                    outcome = "untyped"
                    errors[type(exc).__name__] += 1
                    if len(samples) < 5:
                        samples.append(f"{kind} {index}: {exc!r}"[:300])
            counts[outcome] += 1

        async def lane() -> None:
            while time.monotonic() < end:
                index = next(next_index)
                if index >= calls:
                    return
                await one(index)

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            if kill_interval > 0:
                nursery.start_soon(_killer, pool, kill_interval, kills, stop)
            async with trio.open_nursery() as lanes:
                for _ in range(concurrency):
                    lanes.start_soon(lane)
            stop.set()
        elapsed = time.monotonic() - start
        stats = pool.statistics()
    total = counts["ok"] + counts["failed"] + counts["misdelivered"] + counts["untyped"] + counts["hang"]
    return {
        "calls": total,
        "seconds": round(elapsed, 2),
        "calls_per_second": round(total / elapsed) if elapsed else 0,
        "ok": counts["ok"],
        "failed": counts["failed"],
        "misdelivered": counts["misdelivered"],
        "untyped": counts["untyped"],
        "hangs": counts["hang"],
        "idempotent_failed": counts["idempotent_failed"],
        "idempotent_failed_twice": counts["idempotent_failed_twice"],
        "by_kind": {
            k: v for k, v in sorted(counts.items()) if k.split("/")[0] in ("echo", "sleep", "execute")
        },
        "errors": dict(errors),
        "kills": len(kills),
        "restarts": stats.restarts,
        "redispatched": stats.redispatched,
        "retried": stats.retried,
        "circuit": str(stats.circuit),
        "circuit_opened": stats.circuit_opened,
        "samples": samples,
    }


def load_violations(report: dict[str, Any]) -> list[str]:
    """The load phase's invariants that failed (empty: all held)."""
    problems = []
    for key in ("misdelivered", "untyped", "hangs", "idempotent_failed"):
        if report[key]:
            problems.append(f"{key}: {report[key]}")
    if report["circuit"] != "closed" or report["circuit_opened"]:
        problems.append(f"circuit {report['circuit']} (opened {report['circuit_opened']} times)")
    if report["ok"] + report["failed"] != report["calls"]:
        problems.append("some calls ended in no outcome")
    return problems


async def run_storm(
    how: str = "fail_at_start", *, workers: int = 2, launcher: str = "auto"
) -> dict[str, Any]:
    """Workers that die as soon as they start: the circuit must open. ``how``: "fail_at_start" (exit 3
    before the handshake) or "killed_when_ready" (SIGKILLed the moment they are ready)."""
    start = time.monotonic()
    failures: list[float] = []
    opened_at: float | None = None
    options: dict[str, Any] = {"fail_at_start": 3} if how == "fail_at_start" else {}

    if how == "fail_at_start":
        async with dspex_trio.open_pool(
            workers=workers, diagnostics=True, launcher=launcher, **options
        ) as pool:
            opened_at = time.monotonic() if pool.circuit is CircuitState.OPEN else None
            reason = pool.statistics().circuit_reason
            found = re.search(r"(\d+) failures", reason)
            launched = int(found.group(1)) if found else 0
            unavailable = False
            try:
                await pool.call("echo", {"value": 1})
            except dspex_trio.PoolUnavailable:
                unavailable = True
        return {
            "how": how,
            "circuit_open": opened_at is not None,
            "seconds_to_open": round(opened_at - start, 3) if opened_at else None,
            "note": "seconds_to_open includes the launcher's start (the zygote template imports dspy)",
            "failures_counted": launched,
            "calls_refused_at_once": unavailable,
            "reason": reason,
        }

    async with dspex_trio.open_pool(workers=workers, diagnostics=True, launcher=launcher) as pool:

        def kill_when_ready(worker: dspex_trio.Worker, old: WorkerState, new: WorkerState, why: str) -> None:
            if new is WorkerState.READY:
                os.kill(worker.pid, signal.SIGKILL)
            elif new is WorkerState.FAILED:
                failures.append(time.monotonic())

        pool._transition_hooks.append(kill_when_ready)
        start = time.monotonic()
        for worker in pool.workers():
            os.kill(worker.pid, signal.SIGKILL)
        with trio.move_on_after(30):
            await _poll(lambda: pool.circuit is CircuitState.OPEN)
            opened_at = time.monotonic()
        counted = len([t for t in failures if opened_at is None or t <= opened_at])
        reason = pool.statistics().circuit_reason
        pool._transition_hooks.remove(kill_when_ready)
    return {
        "how": how,
        "circuit_open": opened_at is not None,
        "seconds_to_open": round(opened_at - start, 3) if opened_at else None,
        "failures_counted": counted,
        "reason": reason,
    }


async def measure(
    *, rounds: int = 5, launcher: str = "auto", heartbeat_interval: float = 0.2, heartbeat_missed: int = 3
) -> dict[str, Any]:
    """Detection and recovery times: medians (and max) over ``rounds`` rounds, in ms / s."""
    kill_failed_ms: list[float] = []
    kill_ready_ms: list[float] = []
    stop_detected_s: list[float] = []
    stop_ready_s: list[float] = []
    async with dspex_trio.open_pool(
        workers=2,
        diagnostics=True,
        launcher=launcher,
        heartbeat_interval=heartbeat_interval,
        heartbeat_missed=heartbeat_missed,
    ) as pool:
        for _ in range(rounds):
            for signum in (signal.SIGKILL, signal.SIGSTOP):
                await _poll(lambda: len(_ready(pool)) >= 2)
                victim = pool.workers()[0]
                for worker in pool.workers():
                    await worker.call("ping")  # served a call: its death is not a start-up failure
                failed_at: list[float] = []

                async def doomed(
                    victim: dspex_trio.Worker = victim, failed_at: list[float] = failed_at
                ) -> None:
                    try:
                        await victim.call("sleep", {"seconds": 30})
                    except DspexError:
                        failed_at.append(time.monotonic())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(doomed)
                    await _poll(lambda victim=victim: victim.in_flight > 0)
                    await trio.sleep(0.05)  # acked and running
                    t0 = time.monotonic()
                    os.kill(victim.pid, signum)
                    await _poll(lambda failed_at=failed_at: bool(failed_at))
                    await _poll(
                        lambda victim=victim: (
                            victim.pid not in {w.pid for w in pool.workers()} and len(_ready(pool)) >= 2
                        )
                    )
                    ready = time.monotonic()
                try:
                    os.kill(victim.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                if signum == signal.SIGKILL:
                    kill_failed_ms.append((failed_at[0] - t0) * 1000)
                    kill_ready_ms.append((ready - t0) * 1000)
                else:
                    stop_detected_s.append(failed_at[0] - t0)
                    stop_ready_s.append(ready - t0)
        launcher_name = pool.statistics().launcher

    def summary(values: list[float], digits: int) -> dict[str, float]:
        return {"median": round(statistics.median(values), digits), "max": round(max(values), digits)}

    return {
        "launcher": launcher_name,
        "rounds": rounds,
        "sigkill_calls_failed_ms": summary(kill_failed_ms, 1),
        "sigkill_replacement_ready_ms": summary(kill_ready_ms, 1),
        "sigstop_heartbeat": f"interval {heartbeat_interval} s x missed {heartbeat_missed}",
        "sigstop_detected_s": summary(stop_detected_s, 3),
        "sigstop_replacement_ready_s": summary(stop_ready_s, 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {}
    problems: list[str] = []
    print(
        f"load: up to {args.calls:,} calls / {args.seconds} s, SIGKILL every {args.kill_interval} s",
        flush=True,
    )
    load = await run_load(
        args.calls,
        args.seconds,
        workers=args.workers,
        kill_interval=args.kill_interval,
        launcher=args.launcher,
    )
    report["load"] = load
    problems += load_violations(load)
    print(json.dumps(load, indent=2), flush=True)
    report["storm"] = []
    for how in ("fail_at_start", "killed_when_ready"):
        storm = await run_storm(how, launcher=args.launcher)
        report["storm"].append(storm)
        print(json.dumps(storm), flush=True)
        if not storm["circuit_open"]:
            problems.append(f"storm {how}: the circuit did not open")
    if not args.no_measure:
        for launcher in ("subprocess", "zygote") if args.long else (args.launcher,):
            figures = await measure(rounds=10 if args.long else 5, launcher=launcher)
            report.setdefault("measure", []).append(figures)
            print(json.dumps(figures), flush=True)
    report["problems"] = problems
    print("OK: every invariant held" if not problems else "FAILED:\n  " + "\n  ".join(problems), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos_load", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--calls", type=int, default=None, help="stop after this many calls (default 100,000)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="or after this long (default 180)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-interval", type=float, default=0.2, help="SIGKILL a worker this often (s)")
    parser.add_argument("--launcher", default="auto", choices=["auto", "zygote", "subprocess"])
    parser.add_argument("--long", action="store_true", help="100,000 calls, up to 15 min, more measurements")
    parser.add_argument("--no-measure", action="store_true", help="skip the detection/recovery measurements")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--verbose", action="store_true", help="show the runtime's warnings (kills, ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("dspex_trio").setLevel(logging.CRITICAL)
    if args.calls is None:
        args.calls = 100_000
    if args.seconds is None:
        args.seconds = 900.0 if args.long else 180.0
    report = trio.run(main_async, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
