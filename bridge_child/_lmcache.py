"""The worker's LM answer cache: DSPy's response cache, bounded, with per-call modes and counted hits.

A worker started with ``--lm-cache-entries N`` (the host's ``open_pool(lm_cache=LMCache(...))``) builds
its network LMs with ``cache=True`` and installs a :class:`WorkerLMCache` as ``dspy.cache``, once, after
the fork (the zygote's template opens no cache: ``bridge_child._programs.preload``):

- in memory, an LRU of at most ``N`` answers per worker (DSPy's own default is a million);
- with ``--lm-cache-dir DIR``, on disk too, in one ``diskcache`` directory that every worker of the pool
  shares (SQLite, safe across processes), holding at most ``--lm-cache-disk-bytes`` bytes: the limit is
  diskcache's ``size_limit`` less :data:`DISK_OVERHEAD_BYTES` for SQLite's own files (the journal), and
  diskcache evicts the oldest answers on each write past it. Entries are read back with DSPy's restricted
  unpickler (plain data only), so a file planted in the directory cannot run code in a worker.

The key of an answer is DSPy's: a SHA-256 of the request (model, messages, settings) without its
``api_key`` (so no key, not even its hash, is in a cache file). Unlike DSPy, the key keeps the API base:
two providers serving a model of the same name never share answers.

Modes, per call (``params["lm_cache"]`` of ``execute``; else the worker's ``--lm-cache-mode``):
``read_write`` reads and stores, ``read_only`` reads and never stores, ``off`` does neither. The answers
read from the cache during one execution are counted (:func:`scope`) and reported in its ``usage`` as
``cache_hits``.

Coalescing (executions on the worker's threads, in ``read_write`` or ``read_only``): on a miss, an
execution becomes the *leader* of that answer key when no other execution leads it (in this worker:
``_flights``; in the pool: a claim ``CLAIM_PREFIX + key`` added atomically to the shared directory,
expiring after ``LEADER_TTL_S``) and sends the request; the others *follow*: they wait for the leader's
answer to be stored (woken at once by a leader in their worker, else looking again every
``FOLLOW_POLL_S``), then read it from the cache, a hit. A leader that fails releases its claim when its
execution ends, and the next follower leads. A follower stops waiting when its call is cancelled, near
its deadline, or after ``FOLLOW_MAX_WAIT_S``, and then sends its own request. Without a disk cache the
coalescing is per worker.

On the asynchronous lane the same election happens on the worker's event loop, before DSPy's async
path reads the cache (``execution.aexecute`` is wrapped when the cache is configured: :func:`_aexecute`
calls :meth:`WorkerLMCache.coordinate`): a follower waits there with ``asyncio.sleep`` (its task's
cancel ends the wait at once), never in one of the few threads DSPy reads the cache from; the leader's
local claim is taken before any await, so identical executions started together on one loop elect one
leader. The lane's reads in those threads then only read (:meth:`WorkerLMCache.get` does not wait for
a lane execution). Streamed executions do not coalesce.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

from bridge_child._context import CallContext, invalid_params

MODES: Final = ("read_write", "read_only", "off")
DEFAULT_MODE: Final = "read_write"
DISK_OVERHEAD_BYTES: Final = 2 * 1024 * 1024
"""Bytes of a disk cache's cap kept for SQLite's own files (its write-ahead log, checkpointed every
``WAL_CHECKPOINT_PAGES`` pages and cut back to ``WAL_LIMIT_BYTES``), not for answers."""
WAL_CHECKPOINT_PAGES: Final = 256
"""SQLite's ``wal_autocheckpoint`` of the disk cache, in pages (1 MiB of 4 KiB pages; SQLite's is 1,000)."""
WAL_LIMIT_BYTES: Final = 1024 * 1024
"""SQLite's ``journal_size_limit`` of the disk cache: the log is cut to this after a checkpoint (bytes)."""
MIN_DISK_BYTES: Final = 2 * DISK_OVERHEAD_BYTES
"""The smallest disk cap a worker accepts (bytes)."""
MAX_MEMORY_ENTRIES: Final = 1_000_000
"""The most answers a worker keeps in memory, whatever it is told (DSPy's own default)."""
KEY_IGNORED: Final = ("api_key",)
"""Request fields left out of an answer's key: the credential only (the base stays in)."""
DISK_TIMEOUT_S: Final = 10.0
"""How long a worker waits for another's write lock on the shared directory (diskcache's default)."""
FOLLOW_POLL_S: Final = 0.05
"""A follower looks for its leader's answer (and at its call's cancel) this often, in seconds."""
FOLLOW_MAX_WAIT_S: Final = 60.0
"""The longest a follower waits for its leader's answer (less if its call's deadline is nearer), in
seconds; then it sends its own request."""
LEADER_TTL_S: Final = 120.0
"""A leader's claim on the shared directory expires after this many seconds (a crashed worker's claim
stops holding its followers back), in seconds."""
CLAIM_PREFIX: Final = "dspex-claim:"
"""Disk keys of the leaders' claims (an answer's key is a bare SHA-256 hex digest)."""


class _Counter:
    """One execution's view of the cache: its hits, and (when it coalesces) the requests it leads."""

    def __init__(self, ctx: CallContext | None = None, coalesce: bool = False, on_loop: bool = False) -> None:
        self.hits = 0
        self.ctx = ctx
        self.coalesce = coalesce
        self.on_loop = on_loop
        """An execution of the asynchronous lane: it coalesces on the event loop (``coordinate``)."""
        self.led: list[str] = []
        self._lock = threading.Lock()

    def hit(self) -> None:
        with self._lock:
            self.hits += 1

    def max_wait(self) -> float:
        remaining = None if self.ctx is None else self.ctx.remaining()
        return FOLLOW_MAX_WAIT_S if remaining is None else max(0.0, min(FOLLOW_MAX_WAIT_S, remaining))

    def pause(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when the call was cancelled."""
        if self.ctx is None:
            time.sleep(seconds)
            return False
        return self.ctx.cancelled.wait(seconds)


_flights: dict[str, threading.Event] = {}
"""The requests this worker's executions lead, by answer key: set when the answer is stored or the
leader gave up (guarded by ``_flights_lock``)."""
_flights_lock = threading.Lock()


_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dspex_lm_cache_mode", default=None)
_HITS: contextvars.ContextVar[_Counter | None] = contextvars.ContextVar("dspex_lm_cache_hits", default=None)

_settings: dict[str, Any] = {"enabled": False, "mode": DEFAULT_MODE}


def enabled() -> bool:
    """Whether this worker caches LM answers (``--lm-cache-entries`` > 0): its LMs use ``cache=True``."""
    return bool(_settings["enabled"])


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"lm_cache must be one of {', '.join(MODES)}, not {mode!r}")
    return str(mode)


def _make_class() -> type:
    from dspy.clients.cache import Cache

    class WorkerLMCache(Cache):  # dspy is untyped
        """``dspy.clients.cache.Cache`` honouring the call's mode, counting its hits, keyed by the
        request without its ``api_key`` (the base included)."""

        def cache_key(self, request: dict[str, Any], ignored_args_for_cache_key: Any = None) -> str:
            return str(super().cache_key(request, list(KEY_IGNORED)))

        def get(self, request: dict[str, Any], ignored_args_for_cache_key: Any = None) -> Any:
            mode = current_mode()
            if mode == "off":
                return None
            answer = self._read(request)
            counter = _HITS.get()
            if answer is not None or counter is None or not counter.coalesce or counter.on_loop:
                return answer  # (a lane execution was coordinated on the loop: ``coordinate``)
            return self._lead_or_follow(request, counter, mode)

        def _read(self, request: dict[str, Any]) -> Any:
            answer = super().get(request, list(KEY_IGNORED))
            counter = _HITS.get()
            if answer is not None and counter is not None:
                counter.hit()
            return answer

        def put(self, request: dict[str, Any], value: Any, *args: Any, **kwargs: Any) -> None:
            if current_mode() != "read_write":
                return
            super().put(request, value, *args, **kwargs)
            try:
                key = self.cache_key(request)
            except Exception:  # DSPy's put gave up on this key too
                return
            self.release(key)

        # -- coalescing: one request per answer key in flight, pool-wide --------------------------
        def _lead_or_follow(self, request: dict[str, Any], counter: _Counter, mode: str) -> Any:
            """None: send the request (this execution leads it, or nobody is worth waiting for);
            else the answer another execution's request stored while this one waited."""
            try:
                key = self.cache_key(request)
            except Exception:
                return None
            give_up_at = time.monotonic() + counter.max_wait()
            while True:
                led = False
                with _flights_lock:
                    flight = _flights.get(key)
                    if flight is None:
                        if mode == "read_write" and self._claim(key):
                            _flights[key] = threading.Event()
                            led = True
                        elif mode != "read_write" and not self._claimed_elsewhere(key):
                            return None
                if led:
                    # A leader may have stored the answer and let go since this execution last looked.
                    answer = self._read(request)
                    if answer is not None:
                        self.release(key)
                        return answer
                    counter.led.append(key)
                    return None
                left = give_up_at - time.monotonic()
                if left <= 0:
                    return None
                wait = min(FOLLOW_POLL_S, left)
                if flight is not None:
                    flight.wait(wait)  # the leader is in this worker: woken when it is done
                    cancelled = counter.ctx is not None and counter.ctx.cancelled.is_set()
                else:
                    cancelled = counter.pause(wait)  # the leader is another worker: look again
                if cancelled:
                    return None
                answer = self._read(request)
                if answer is not None:
                    return answer

        async def coordinate(self, request: dict[str, Any], counter: _Counter) -> None:
            """(The lane's event loop, before DSPy reads the cache for ``request``) Lead this answer
            (return at once: the request will be sent, unless the cache has it by now), or follow
            its leader in this worker or another until it is done, then return (the cache then has
            its answer, or the leader failed and ``get`` misses). Never waits past the call's
            deadline or ``FOLLOW_MAX_WAIT_S``; a cancel of the task ends the wait."""
            import asyncio

            mode = current_mode()
            if mode == "off":
                return
            try:
                key = self.cache_key(request)
            except Exception:
                return
            give_up_at = time.monotonic() + counter.max_wait()
            followed = False
            while True:
                mine: threading.Event | None = None
                with _flights_lock:  # no await between the look and the claim: one leader per loop
                    flight = _flights.get(key)
                    if flight is None and mode == "read_write" and not followed:
                        mine = _flights[key] = threading.Event()
                if mine is not None:
                    try:
                        claimed = await asyncio.to_thread(self._claim, key)  # pool-wide, on disk
                    except BaseException:
                        self.release(key)
                        raise
                    if claimed:
                        counter.led.append(key)  # released when its answer is stored, or at its end
                        return
                    with _flights_lock:  # another worker leads it: follow that one
                        if _flights.get(key) is mine:
                            del _flights[key]
                    mine.set()
                elif flight is None and not (
                    self.enable_disk_cache and await asyncio.to_thread(self._claimed_elsewhere, key)
                ):
                    if not followed:
                        return  # nobody leads it: read the cache, or send the request
                    # The leader followed is done: its answer is stored, or it failed (then lead).
                    if mode != "read_write" or await asyncio.to_thread(self._peek, request) is not None:
                        return
                    followed = False
                    continue
                followed = True
                left = give_up_at - time.monotonic()
                if left <= 0:
                    return
                await asyncio.sleep(min(FOLLOW_POLL_S, left))

        def _peek(self, request: dict[str, Any]) -> Any:
            """The stored answer to ``request``, or None (not counted as a hit)."""
            return super().get(request, list(KEY_IGNORED))

        def _claim(self, key: str) -> bool:
            if not self.enable_disk_cache:
                return True
            try:
                return bool(self.disk_cache.add(CLAIM_PREFIX + key, os.getpid(), expire=LEADER_TTL_S))
            except Exception:  # the directory is busy or broken: lead, as without a disk cache
                return True

        def _claimed_elsewhere(self, key: str) -> bool:
            if not self.enable_disk_cache:
                return False
            try:
                return CLAIM_PREFIX + key in self.disk_cache
            except Exception:
                return False

        def release(self, key: str) -> None:
            """The request for ``key`` is done (its answer stored, or its leader gave up)."""
            with _flights_lock:
                flight = _flights.pop(key, None)
            if flight is None:
                return
            flight.set()
            if self.enable_disk_cache:
                with contextlib.suppress(Exception):
                    self.disk_cache.delete(CLAIM_PREFIX + key)

    return WorkerLMCache


def configure(
    entries: int, directory: str | None = None, disk_bytes: int | None = None, mode: str = DEFAULT_MODE
) -> Any:
    """Install the worker's cache as ``dspy.cache`` (after the fork: it may open SQLite files) and build
    LMs with ``cache=True`` from now on. ``entries`` <= 0 leaves the cache off (DSPy's caches disabled).

    Raises:
        ValueError: a mode not in :data:`MODES`, or a disk cap below :data:`MIN_DISK_BYTES`.
    """
    import dspy

    mode = check_mode(mode)
    if entries <= 0:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        _settings.update(enabled=False, mode=mode)
        return dspy.cache
    cls = _make_class()
    cache = cls(
        enable_disk_cache=False,
        enable_memory_cache=True,
        disk_cache_dir=None,
        memory_max_entries=min(entries, MAX_MEMORY_ENTRIES),
    )
    if directory:
        if disk_bytes is None or disk_bytes < MIN_DISK_BYTES:
            raise ValueError(
                f"the LM disk cache's cap must be at least {MIN_DISK_BYTES} bytes, not {disk_bytes}"
            )
        import diskcache
        from dspy.clients.disk_serialization import restricted_disk

        cache.disk_cache = diskcache.Cache(
            directory,
            timeout=DISK_TIMEOUT_S,
            size_limit=disk_bytes - DISK_OVERHEAD_BYTES,
            disk=restricted_disk(frozenset()),
            sqlite_wal_autocheckpoint=WAL_CHECKPOINT_PAGES,
            sqlite_journal_size_limit=WAL_LIMIT_BYTES,
        )
        cache.enable_disk_cache = True
        cache.disk_cache_dir = directory
    with getattr(dspy, "_cache_lock", None) or contextlib.nullcontext():
        dspy.cache = cache
    _settings.update(enabled=True, mode=mode)
    _install_coordination()
    return cache


_original_aexecute: Any = None


def _install_coordination() -> None:
    """Wrap DSPy's ``execution.aexecute`` (looked up by name at each async LM call) with
    :func:`_aexecute`, once."""
    global _original_aexecute
    from dspy.clients import execution

    if _original_aexecute is None:
        _original_aexecute = execution.aexecute
        execution.aexecute = _aexecute


async def _aexecute(lm: Any, call: Any) -> Any:
    """``execution.aexecute``: a lane execution that coalesces elects its leader on the loop first."""
    counter = _HITS.get()
    if counter is not None and counter.on_loop and getattr(call, "cache", False):
        import dspy

        coordinate = getattr(dspy.cache, "coordinate", None)
        if coordinate is not None:
            await coordinate(call.key(lm, True), counter)
    return await _original_aexecute(lm, call)


def call_mode(ctx: CallContext) -> str | None:
    """The call's ``params["lm_cache"]`` (None when absent: the worker's mode)."""
    mode = ctx.param("lm_cache", str, None)
    if mode is not None and mode not in MODES:
        raise invalid_params(f"{ctx.method}: lm_cache must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def current_mode() -> str:
    mode = _MODE.get()
    return _settings["mode"] if mode is None else mode


@contextlib.contextmanager
def scope(
    mode: str | None, ctx: CallContext | None = None, *, coalesce: bool = False, on_loop: bool = False
) -> Iterator[_Counter]:
    """The cache mode of one execution (None: the worker's) and the counter of its hits; the context
    is copied into the threads DSPy's async path reads the cache from (``asyncio.to_thread``).

    With ``coalesce`` (an execution in a thread of its own: a follower's wait holds its thread), a miss
    waits for an identical request already in flight in the pool (module docstring) instead of
    sending another; the requests it leads are released when it ends, whatever happened to them.
    ``on_loop`` (with ``coalesce``): an execution of the asynchronous lane, whose wait is on the
    event loop (``WorkerLMCache.coordinate``)."""
    counter = _Counter(ctx, coalesce, on_loop)
    mode_token = _MODE.set(None if mode is None else check_mode(mode))
    hits_token = _HITS.set(counter)
    try:
        yield counter
    finally:
        _HITS.reset(hits_token)
        _MODE.reset(mode_token)
        if counter.led:
            import dspy

            release = getattr(dspy.cache, "release", None)
            for key in counter.led:
                if release is not None:
                    release(key)


def with_hits(usage: dict[str, Any] | None, counter: _Counter) -> dict[str, Any] | None:
    """``usage`` with ``cache_hits`` (when this worker caches: 0 is reported too)."""
    if not enabled():
        return usage
    if usage is None:
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "by_model": {}}
    return {**usage, "cache_hits": counter.hits}
