"""The option records of a worker handle and of a pool, and how a function takes one: as an object or as
its fields.

``open_worker(options=WorkerOptions(...))`` or ``open_worker(capacity=8, ...)``; ``open_pool(options=
PoolOptions(...), worker_options=WorkerOptions(...))`` or ``open_pool(workers=4, capacity=8, ...)``: each
record either way, never both (``TypeError``), and a keyword no record has is a ``TypeError`` naming the
known ones. The websocket server's record, :class:`~dspex_trio.WebsocketOptions`, lives with its layer
(``_ws_options.py``) and is taken the same way (:func:`options_from`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import attrs

from bridge_child import wire
from bridge_child.registry import check_module_names
from dspex_trio._launcher import DEFAULT_CAPACITY, check_env_names
from dspex_trio._sessions import DEFAULT_SESSION_TTL_S
from dspex_trio._validators import at_least, non_negative, positive

MAX_REDISPATCHES: Final = 3
"""Default re-dispatches of a call that never started (``retry_max_attempts`` is this + 1)."""

R = TypeVar("R")


@attrs.frozen(kw_only=True)
class WorkerOptions:
    """Timeouts and limits of one worker handle. Every duration is in seconds."""

    capacity: int = attrs.field(default=DEFAULT_CAPACITY, validator=positive)
    """Calls the worker runs at once (threads in the worker)."""
    start_timeout: float = attrs.field(default=30.0, validator=positive)
    """From launch to the worker's ``hello``."""
    ack_timeout: float = attrs.field(default=5.0, validator=positive)
    """From sending a call to its ack; past it the worker is wedged: killed and replaced."""
    heartbeat_interval: float = attrs.field(default=1.0, validator=positive)
    """A ping every this many seconds."""
    heartbeat_missed: int = attrs.field(default=3, validator=positive)
    """Silent for ``interval x missed`` seconds: unresponsive, killed (detected within ``x (missed + 1)``)."""
    shutdown_grace: float = attrs.field(default=5.0, validator=non_negative)
    """On close: how long running calls may finish after the ``shutdown`` frame."""
    term_grace: float = attrs.field(default=2.0, validator=non_negative)
    """On close: from SIGTERM to SIGKILL."""
    max_pending_calls: int = attrs.field(default=10_000, validator=positive)
    """Calls in flight on one handle (past the worker's capacity they queue in the worker)."""
    max_stream_events: int = attrs.field(default=1024, validator=positive)
    """Events buffered for one streamed call whose consumer lags; past it the call fails."""
    max_frame_bytes: int = attrs.field(default=wire.DEFAULT_MAX_FRAME_BYTES, validator=positive)
    """Largest frame either way, in bytes."""
    worker_env: tuple[str, ...] = attrs.field(default=(), converter=check_env_names)
    """Names of variables of this process's environment the worker gets besides the allow-list
    (``dspex_trio._launcher.worker_environment``); applied by the launcher that dspex-trio builds."""
    programs: tuple[str, ...] = attrs.field(default=(), converter=check_module_names)
    """The operator's program modules (``myapp.programs``), imported by every worker before its hello
    (by the zygote template, before it forks): what ``create_program(module=...)`` may name."""
    async_capacity: int = attrs.field(default=0, validator=at_least(0))
    """Executions with a network LM the worker runs at once on its asynchronous lane, besides its
    ``capacity`` threads (DSPy's async API on an event loop of the worker's own: no thread each); 0:
    none, they take threads (docs/lm.md)."""


@attrs.frozen(kw_only=True)
class PoolOptions:
    """The pool's own settings. Every duration is in seconds."""

    workers: int = attrs.field(default=2, validator=at_least(1))
    """Worker slots."""
    max_queue: int = attrs.field(default=1024, validator=at_least(0))
    """Calls waiting for a worker with free capacity; past it, ``Overloaded`` (or wait, if asked)."""
    restart_intensity: int = attrs.field(default=5, validator=at_least(0))
    """More than this many counted restarts within ``restart_period`` open the circuit (the breaker's
    failure threshold is ``restart_intensity + 1``)."""
    restart_period: float = attrs.field(default=10.0, validator=at_least(0))
    """The breaker's failure window."""
    min_healthy_uptime: float = attrs.field(default=1.0, validator=at_least(0))
    """A worker that fails before its handshake, or within this uptime having served no call, counts
    against the restart budget; one killed after serving calls is simply replaced."""
    probe_backoff: float = attrs.field(default=0.5, validator=at_least(0))
    """The breaker's reset timeout: first wait before a probe while the circuit is open; doubles per
    failed probe up to ``probe_backoff_max``."""
    probe_backoff_max: float = attrs.field(default=30.0, validator=at_least(0))
    half_open_probes: int = attrs.field(default=1, validator=at_least(1))
    """Worker starts that must succeed while half-open to close the circuit (a probe is one worker
    start in an empty slot, so at most ``workers`` are needed; fewer if no other slot is empty)."""
    retry_backoff: float = attrs.field(default=0.01, validator=at_least(0))
    """Wait before re-sending a call after its worker failed; grows by ``retry_backoff_multiplier`` per
    attempt up to ``retry_backoff_max``, with ``retry_jitter`` of it random."""
    retry_backoff_multiplier: float = attrs.field(default=2.0, validator=at_least(1))
    retry_backoff_max: float = attrs.field(default=1.0, validator=at_least(0))
    retry_jitter: float = attrs.field(default=0.5, validator=at_least(0))
    """Random fraction of each retry wait, within [0, 1]."""
    retry_max_attempts: int = attrs.field(default=MAX_REDISPATCHES + 1, validator=at_least(1))
    """Attempts of one call in all (re-dispatches of never-acked calls and idempotent retries)."""
    drain_grace: float = attrs.field(default=10.0, validator=at_least(0))
    """On close: how long in-flight calls may finish before the workers are torn down."""
    max_calls_per_worker: int | None = attrs.field(default=None, validator=at_least(1, optional=True))
    """Recycle a worker after this many calls (None: never)."""
    max_worker_rss_bytes: int | None = attrs.field(default=None, validator=at_least(1, optional=True))
    """Recycle a worker whose resident memory passes this, in bytes (None: never)."""
    rss_check_interval: float = attrs.field(default=5.0, validator=at_least(0.01))
    session_ttl: float = attrs.field(default=DEFAULT_SESSION_TTL_S, validator=at_least(0))
    python: str = sys.executable
    """Interpreter for the subprocess launcher and the zygote template."""


def field_names(record: type[Any]) -> frozenset[str]:
    """The fields of an option record (the keywords that build it)."""
    return frozenset(a.name for a in attrs.fields(record))


def options_from(record: type[R], options: R | None, fields: Mapping[str, Any]) -> R:
    """The ``record`` a function was given: ``options`` itself, or one built from its ``fields`` (the
    keywords it was called with).

    Raises:
        TypeError: both were given; ``options`` is not a ``record``; a keyword is not one of its fields.
        ValueError: a field's value breaks its rule (from the record's validators).
    """
    name = record.__name__
    if options is not None:
        if fields:
            raise TypeError(
                f"pass options={name}(...) or its fields as keywords ({', '.join(sorted(fields))}), not both"
            )
        if not isinstance(options, record):
            raise TypeError(f"options must be a {name}, not {type(options).__name__}")
        return options
    unknown = sorted(set(fields) - field_names(record))
    if unknown:
        known = ", ".join(sorted(field_names(record)))
        raise TypeError(f"unknown {name} field(s) {', '.join(unknown)}; known: {known}")
    return record(**fields)


def pool_options_from(
    options: PoolOptions | None, worker_options: WorkerOptions | None, fields: Mapping[str, Any]
) -> tuple[PoolOptions, WorkerOptions]:
    """``open_pool``'s two records, each from its object or from its share of the keywords ``fields``.

    Raises:
        TypeError: a record given both ways, or a keyword that is a field of neither (the message names
            the known ones).
    """
    pool_fields, worker_fields = field_names(PoolOptions), field_names(WorkerOptions)
    unknown = sorted(set(fields) - pool_fields - worker_fields)
    if unknown:
        known = ", ".join(sorted(pool_fields | worker_fields))
        raise TypeError(f"unknown pool option(s) {', '.join(unknown)}; known: {known}")
    return (
        options_from(PoolOptions, options, {k: v for k, v in fields.items() if k in pool_fields}),
        options_from(WorkerOptions, worker_options, {k: v for k, v in fields.items() if k in worker_fields}),
    )
