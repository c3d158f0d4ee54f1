"""The worker's methods: the core ones, diagnostics that exist only when enabled, and the registry that
adds the DSPy methods of ``_programs``.

A method is ``func(worker, ctx) -> value`` (plain data), described by a ``_context.Method``. *Inline*
methods are cheap and never block: the reader thread runs them itself, so their ack and result leave in
one write. The others run in the worker's thread pool (or on its CPU lane, see ``_lane``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from bridge_child import _gepa, _jobs, _programs, _propose, wire
from bridge_child._cache import program_cache
from bridge_child._context import CallContext, Method, MethodError, invalid_params
from bridge_child.tcp import ACCELERATOR_ENV

if TYPE_CHECKING:
    from bridge_child._server import Worker

MAX_SPEW_BYTES: Final = 256 * 1024 * 1024
"""Largest ``spew_*`` / ``garbage`` request, in bytes."""
SPEW_CHUNK_BYTES: Final = 64 * 1024
MAX_SLEEP_SECONDS: Final = 24 * 3600.0


# -- core -------------------------------------------------------------------------------------------


def ping(worker: Worker, ctx: CallContext) -> Any:
    return {"pid": os.getpid(), "worker_id": worker.worker_id}


def stats(worker: Worker, ctx: CallContext) -> Any:
    with worker.lock:  # this call itself is left out
        executing = sorted(worker.executing - {ctx.id})
        pending = sorted(worker.contexts.keys() - {ctx.id})
        abandoned = sorted(i for i in executing if i not in worker.contexts)
        counters = dict(worker.counters)
        leases = None
        if worker.leases is not None:  # --lease-lms: leases taken, refused, abandoned; threads waiting
            leases = {**worker.leases.counters, "waiting": worker.leases.waiting}
    return {
        "pid": os.getpid(),
        "worker_id": worker.worker_id,
        "capacity": worker.capacity,
        "executing": executing,
        "pending": pending,
        "abandoned": abandoned,
        "threads": threading.active_count(),
        "uptime": time.monotonic() - worker.started_at,
        "rss_bytes": rss_bytes(),
        "accelerators": {name: os.environ[name] for name in sorted(ACCELERATOR_ENV) if name in os.environ},
        "cached_programs": program_cache(worker).snapshot(),
        "leases": leases,
        **counters,
    }


def reset(worker: Worker, ctx: CallContext) -> Any:
    """Drop everything the worker caches (programs, LM clients)."""
    dropped = program_cache(worker).clear()
    worker.state.pop("lms", None)
    return {"programs_dropped": dropped}


def shutdown(worker: Worker, ctx: CallContext) -> Any:
    grace = ctx.param("grace", (int, float), 5.0)
    worker._on_shutdown(float(grace))
    return True


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- diagnostics ------------------------------------------------------------------------------------


def echo(worker: Worker, ctx: CallContext) -> Any:
    params = ctx.params if ctx.params is not None else {}
    if not isinstance(params, dict) or "value" not in params:
        raise invalid_params("echo: params must be {'value': ...}")
    return params["value"]


def sleep(worker: Worker, ctx: CallContext) -> Any:
    seconds = ctx.param("seconds", (int, float))
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise invalid_params(f"sleep: seconds must be within [0, {MAX_SLEEP_SECONDS}]")
    ticks = ctx.param("ticks", int, 0)
    if ticks > 0:  # stream `ticks` events spread over the sleep
        for tick in range(ticks):
            if ctx.cancelled.wait(seconds / ticks):
                return None
            ctx.emit({"tick": tick})
    elif ctx.cancelled.wait(seconds):
        return None
    return seconds


def cpu(worker: Worker, ctx: CallContext) -> Any:
    """Busy loop for ``seconds`` (holding the GIL most of the time), stopping early when cancelled
    unless ``ignore_cancel``. With ``lane: true`` it runs on the CPU lane instead of the thread pool."""
    seconds = ctx.param("seconds", (int, float))
    stoppable = not ctx.param("ignore_cancel", bool, False)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end and not (stoppable and ctx.cancelled.is_set()):
        n += sum(range(1000))
    return n


def crash(worker: Worker, ctx: CallContext) -> Any:
    signame = ctx.param("signal", str, None)
    if signame is not None:
        try:
            signum = signal.Signals[signame]
        except KeyError:
            raise invalid_params(f"crash: unknown signal {signame!r}") from None
        # crash runs in a pool thread, and only the main thread may change a disposition
        if signal.getsignal(signum) != signal.SIG_DFL:
            if threading.current_thread() is not threading.main_thread():
                raise invalid_params(f"crash: {signame} is ignored or handled in this worker")
            signal.signal(signum, signal.SIG_DFL)  # pragma: no cover - crash is not inline
        os.kill(os.getpid(), signum)
        time.sleep(10)  # pragma: no cover - the signal ends us
    code = ctx.param("exit_code", int, 1)
    sys.stderr.flush()
    os._exit(code)


def hang(worker: Worker, ctx: CallContext) -> Any:
    """Stop reading and answering entirely, like a stopped process (the watchdog still sees EOF)."""
    threading.Event().wait()


def spew_stdout(worker: Worker, ctx: CallContext) -> Any:
    total = _spew_size(ctx)
    text = "x" * (SPEW_CHUNK_BYTES - 1) + "\n"
    left = total
    while left > 0 and not ctx.cancelled.is_set():
        n = min(left, SPEW_CHUNK_BYTES)
        half = n // 2
        os.write(1, text[:half].encode())  # the raw fd, as a C extension would
        sys.stdout.write(text[: n - half])  # and Python's sys.stdout, as print() would
        left -= n
    sys.stdout.flush()
    return total


def spew_stderr(worker: Worker, ctx: CallContext) -> Any:
    total = _spew_size(ctx)
    line = ("e" * 99 + "\n").encode()
    chunk = line * (SPEW_CHUNK_BYTES // len(line))
    left = total
    while left > 0 and not ctx.cancelled.is_set():
        part = chunk[: min(left, len(chunk))]
        os.write(2, part)
        left -= len(part)
    return total


def garbage(worker: Worker, ctx: CallContext) -> Any:
    """Write raw bytes onto the frame stream itself (the parent must detect a corrupt frame)."""
    total = _spew_size(ctx)
    worker.write_raw(bytes((i * 37 + 11) % 256 for i in range(total)))
    return total


def ignore_signal(worker: Worker, ctx: CallContext) -> Any:
    name = ctx.param("signal", str, "SIGTERM")
    try:
        signum = signal.Signals[name]
    except KeyError:
        raise invalid_params(f"ignore_signal: unknown signal {name!r}") from None
    signal.signal(signum, signal.SIG_IGN)  # the reader is the main thread
    return name


def spawn_child(worker: Worker, ctx: CallContext) -> Any:
    """Start a grandchild process that sleeps; returns its pid (it must die with the worker's group)."""
    seconds = ctx.param("seconds", (int, float), 3600)
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({float(seconds)!r})"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    return proc.pid


def unencodable(worker: Worker, ctx: CallContext) -> Any:
    """Return a value the codec cannot carry."""
    return {"value": object()}


RAISABLE: Final[dict[str, type[BaseException]]] = {
    "RuntimeError": RuntimeError,
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
}
"""What the ``raise`` diagnostic can raise: a plain error, and the two that are not ``Exception``."""


def raise_(worker: Worker, ctx: CallContext) -> Any:
    """Raise ``kind`` (default RuntimeError) with ``message``; ``lane: true`` runs it on the CPU lane."""
    message = ctx.param("message", str, "raised on request")
    kind = ctx.param("kind", str, "RuntimeError")
    if kind not in RAISABLE:
        raise invalid_params(f"raise: kind must be one of {', '.join(RAISABLE)}")
    raise RAISABLE[kind](message)


def fail(worker: Worker, ctx: CallContext) -> Any:
    """Fail with a given error code (to test the runtime's mapping of codes to exceptions)."""
    code = ctx.param("code", str)
    try:
        error_code = wire.ErrorCode(code)
    except ValueError:
        raise invalid_params(f"fail: unknown code {code!r}") from None
    raise MethodError(
        error_code, ctx.param("message", str, "failed on request"), type=ctx.param("type", str, "")
    )


def program_info(worker: Worker, ctx: CallContext) -> Any:
    """Resolve the call's program through the cache (materialising a spec as itself) and describe it."""
    cache = program_cache(worker)
    misses = cache.misses
    program_id, spec = cache.resolve(ctx, dict)
    return {"id": program_id, "spec": spec, "from_call": cache.misses > misses, "pid": os.getpid()}


def _spew_size(ctx: CallContext) -> int:
    n = ctx.param("bytes", int)
    if not 0 <= n <= MAX_SPEW_BYTES:
        raise invalid_params(f"{ctx.method}: bytes must be within [0, {MAX_SPEW_BYTES}]")
    return int(n)


def _lane_param(worker: Worker, ctx: CallContext) -> bool:
    """Diagnostics run on the CPU lane when the call says ``lane: true``."""
    return bool(ctx.param("lane", bool, False))


CORE_METHODS: Final = {
    "ping": Method(ping, inline=True),
    "stats": Method(stats, inline=True),
    "shutdown": Method(shutdown, inline=True),
    "reset": Method(reset, inline=True),
}

DIAGNOSTIC_METHODS: Final = {
    "echo": Method(echo, inline=True, diagnostic=True),
    "sleep": Method(sleep, diagnostic=True),
    "cpu": Method(cpu, diagnostic=True, lane=_lane_param),
    "crash": Method(crash, diagnostic=True),
    "hang": Method(hang, inline=True, flush_first=True, diagnostic=True),
    "spew_stdout": Method(spew_stdout, diagnostic=True),
    "spew_stderr": Method(spew_stderr, diagnostic=True),
    "garbage": Method(garbage, diagnostic=True),
    "ignore_signal": Method(ignore_signal, inline=True, diagnostic=True),
    "spawn_child": Method(spawn_child, diagnostic=True),
    "unencodable": Method(unencodable, inline=True, diagnostic=True),
    "raise": Method(raise_, diagnostic=True, lane=_lane_param),
    "fail": Method(fail, inline=True, diagnostic=True),
    "program_info": Method(program_info, inline=True, diagnostic=True),
}


def build_registry(*, diagnostics: bool) -> dict[str, Method]:
    registry = dict(CORE_METHODS)
    if diagnostics:
        registry.update(DIAGNOSTIC_METHODS)
    registry.update(_programs.METHODS)
    registry.update(_jobs.METHODS)
    registry.update(_propose.METHODS)
    registry.update(_gepa.METHODS)
    return registry
