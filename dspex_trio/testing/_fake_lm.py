"""A fake OpenAI-compatible LM server on Trio and h11, for tests and benchmarks.

DSPy's own HTTP client (``dspy.LM("openai/<model>", api_base=url, api_key="x")``) talks to it exactly as
it would to a real provider, so a test exercises DSPy's real network path (request building, SSE
streaming, error mapping, connection reuse) with no LLM API and no network.

Answers are deterministic, built from the request by ``_fake_answers`` (pure: DSPy's prompt read with the
program-spec layer's parser, values derived from a hash of the last user message, typed as the prompt
asks). This module is the HTTP side: listening, connections, limits, faults.

Faults are injected through :class:`FakeLMConfig` (latency, HTTP error statuses for the next N requests
or with a seeded probability, answers that never come, answers DSPy cannot parse); a running server's
config can be replaced at any time (:attr:`FakeLM.config`, :meth:`FakeLM.configure`).

It is a test tool, but it listens on a socket, so its work per request is bounded: the body is read up
to ``MAX_BODY_BYTES`` (a larger one is refused with ``413`` before it is parsed), the head up to
``MAX_HEADER_BYTES``, answers are built in work linear in the body (``_fake_answers``), a body nested too
deeply to parse is a ``400``. It binds 127.0.0.1 by default and warns (log and, from the command line,
stderr) when bound to any other address: it has no authentication.

Endpoints: ``POST /v1/chat/completions`` (JSON, or SSE with ``"stream": true``), ``GET /v1/models``,
``GET /health``, ``GET /v1/stats`` (the counters and recorded times, for a server in another
process). The same paths without the ``/v1`` prefix are accepted too.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import random
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import h11
import trio

from dspex_trio._util import open_service_nursery
from dspex_trio._validators import at_least, finite_non_negative, fraction, http_error_status
from dspex_trio.testing import _close_watch
from dspex_trio.testing._fake_answers import (
    MALFORMED_REPLY,
    BadRequest,
    completion_body,
    dumps,
    parse_chat_request,
    render_reply,
    stream_events,
    usage,
)
from dspex_trio.testing._http import HttpConnection, PayloadTooLarge, content_length

logger = logging.getLogger(__name__)

# --- Limits -------------------------------------------------------------------------------------------

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted, in bytes; a larger one gets ``413 Payload Too Large``."""

MAX_CONNECTIONS = 256
"""Connections served at once by default, a count (``max_connections=``, ``--max-connections``);
further clients wait in the listen backlog."""

LISTEN_BACKLOG = 128
"""Pending connections the kernel queues for ``accept``, a count (at least ``max_connections`` when
that is larger: a thousand clients connecting at once must not overflow it)."""

KEEPALIVE_IDLE_TIMEOUT_S = 60.0
"""Seconds an idle keep-alive connection may wait for its next request before the server closes it."""

BODY_READ_TIMEOUT_S = 30.0
"""Seconds allowed to read a request body once its head has arrived; the connection is closed after."""

ACCEPT_RETRY_DELAY_S = 0.1
"""Seconds to wait before accepting again when the process is out of file descriptors or memory."""

MAX_RECORDED_TIMES = 100_000
"""Arrival and disconnect times kept for :meth:`FakeLM.max_arrivals_in_window` and friends, a count
(the oldest are dropped first)."""

_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

_SERVER_HEADER = b"dspex-trio-fake-lm"


# --- Configuration and statistics ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class FakeLMConfig:
    """How a fake LM server answers chat completions (``/health`` and ``/v1/models`` are never faulted).

    Faults are checked in this order: ``timeout``, then ``fail_status``, then ``malformed``.

    While a completion waits (``latency_s``, ``latency_jitter_s``, ``stream_chunk_delay_s``, ``timeout``)
    the server watches its connection: a client that disconnects is noticed at once
    (:attr:`FakeLMStatistics.client_disconnects`, :attr:`FakeLM.disconnect_times`), as a real provider
    stops generating when its client goes away.
    """

    model: str = "fake"
    """Model id listed by ``/v1/models`` (completions echo the model the client asked for)."""

    latency_s: float = attrs.field(default=0.0, validator=finite_non_negative)
    """Seconds to wait before answering a completion (an injected error too)."""

    latency_jitter_s: float = attrs.field(default=0.0, validator=finite_non_negative)
    """Up to this many more seconds of latency per completion, drawn uniformly for each request from the
    seeded random generator (so requests of one run differ, and two runs with one seed agree)."""

    stream_chunk_delay_s: float = attrs.field(default=0.0, validator=finite_non_negative)
    """Seconds to wait between two SSE chunks of a streamed answer."""

    stream_chunk_chars: int = attrs.field(default=8, validator=at_least(1))
    """Characters of answer text per SSE chunk (real providers send a token or a few per chunk)."""

    fail_status: int | None = attrs.field(default=None, validator=http_error_status)
    """HTTP status (such as 429 or 500) to answer completions with instead of a reply; None: no failures."""

    fail_count: int | None = attrs.field(default=None, validator=at_least(0, optional=True))
    """How many completions fail with ``fail_status`` (counted from when this config was installed);
    None: no limit."""

    retry_after_s: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(finite_non_negative)
    )
    """Seconds sent in a ``Retry-After`` header with each injected failure (as a provider does with a
    ``429``); None: no header."""

    fail_probability: float = attrs.field(default=1.0, validator=fraction)
    """Chance that a completion fails with ``fail_status`` while ``fail_count`` is not used up."""

    seed: int = 0
    """Seed of the random generator behind ``fail_probability`` (reset whenever a config is installed)."""

    timeout: bool = False
    """Read each completion request but never answer it, until the client gives up and disconnects."""

    malformed: bool = False
    """Answer text in neither the ChatAdapter nor the JSONAdapter format: DSPy raises AdapterParseError
    (after its JSONAdapter retry, a second request)."""


@attrs.define
class FakeLMStatistics:
    """Counters of a fake LM server since it started (or since :meth:`FakeLM.reset_statistics`)."""

    http_requests: int = 0
    """Every HTTP request with a well-formed head, any path."""

    completions: int = 0
    """``POST /v1/chat/completions`` requests (the LM calls DSPy made), faulted ones included."""

    streamed: int = 0
    """Completions answered as an SSE stream."""

    failures_injected: int = 0
    """Completions answered with ``fail_status``."""

    timeouts_injected: int = 0
    """Completions left unanswered (``timeout`` mode)."""

    malformed_served: int = 0
    """Completions answered with :data:`MALFORMED_REPLY`."""

    bad_requests: int = 0
    """Requests rejected as malformed HTTP or JSON (4xx other than 404/405/413)."""

    rejected_too_large: int = 0
    """Requests rejected with ``413`` because of their body size."""

    connections_accepted: int = 0
    """TCP connections accepted."""

    connections_open: int = 0
    """TCP connections open now."""

    completions_in_flight: int = 0
    """Completions received and not yet answered (or given up) now."""

    max_completions_in_flight: int = 0
    """The most completions in flight at once."""

    client_disconnects: int = 0
    """Completions whose client closed the connection before the answer was complete (a cancelled
    request: a real provider would stop generating)."""


class FakeLM:
    """A running fake LM server: its address, its (replaceable) config and its counters.

    Made by :func:`serve_fake_lm` (passed to ``task_status.started``) or :func:`open_fake_lm`.
    """

    def __init__(self, host: str, port: int, config: FakeLMConfig) -> None:
        self.host = host
        self.port = port
        self.statistics = FakeLMStatistics()
        self._config = config
        self._fail_budget = config.fail_count
        self._rng = random.Random(config.seed)
        self._cancel_scope: trio.CancelScope | None = None
        self._close_watcher: _close_watch.CloseWatcher | None = None
        """Watches the connections of the completions waiting for their answer (Linux; else None)."""
        self.arrival_times: deque[float] = deque(maxlen=MAX_RECORDED_TIMES)
        """``time.monotonic()`` at each completion's arrival (its head read), oldest first."""
        self.disconnect_times: deque[float] = deque(maxlen=MAX_RECORDED_TIMES)
        """``time.monotonic()`` at each client disconnect counted in ``client_disconnects``."""

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (no path)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-style API base, ``http://HOST:PORT/v1``, for ``dspy.LM(..., api_base=url)``."""
        return f"{self.base_url}/v1"

    @property
    def requests(self) -> int:
        """Chat completion requests received (one per LM call; faulted ones included)."""
        return self.statistics.completions

    @property
    def config(self) -> FakeLMConfig:
        return self._config

    @config.setter
    def config(self, config: FakeLMConfig) -> None:
        """Install a new config: it applies to requests that arrive from now on. The ``fail_count``
        budget and the random generator start over."""
        self._config = config
        self._fail_budget = config.fail_count
        self._rng = random.Random(config.seed)

    def configure(self, **changes: Any) -> FakeLMConfig:
        """Install a copy of the current config with ``changes`` (field names of :class:`FakeLMConfig`)."""
        self.config = attrs.evolve(self._config, **changes)
        return self._config

    def reset_statistics(self) -> None:
        """Start the counters and recorded times over (the gauges of what is open now are kept)."""
        old = self.statistics
        self.statistics = FakeLMStatistics(
            connections_open=old.connections_open, completions_in_flight=old.completions_in_flight
        )
        self.arrival_times.clear()
        self.disconnect_times.clear()

    def stats_json(self) -> dict[str, Any]:
        """What ``GET /v1/stats`` answers: the counters, and the arrival and disconnect times
        (``time.monotonic()`` of this machine: comparable with another process's)."""
        return {
            **attrs.asdict(self.statistics),
            "arrival_times": list(self.arrival_times),
            "disconnect_times": list(self.disconnect_times),
        }

    def max_arrivals_in_window(self, window_s: float = 1.0) -> int:
        """The most completions that arrived within any ``window_s`` seconds (a sliding window over
        :attr:`arrival_times`): what a rate limit of N per ``window_s`` must keep at or below N."""
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        times = list(self.arrival_times)
        best = 0
        start = 0
        for end, t in enumerate(times):
            while t - times[start] >= window_s:
                start += 1
            best = max(best, end - start + 1)
        return best

    def arrivals_per_second(self) -> list[int]:
        """Completions that arrived in each whole second since the first recorded arrival."""
        times = list(self.arrival_times)
        if not times:
            return []
        counts = [0] * (int(times[-1] - times[0]) + 1)
        for t in times:
            counts[int(t - times[0])] += 1
        return counts

    def stop(self) -> None:
        """Stop serving: :func:`serve_fake_lm` closes its listener and connections and returns."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def _latency(self, config: FakeLMConfig) -> float:
        """The latency of the current completion (a draw from the generator when jittered)."""
        if config.latency_jitter_s > 0:
            return config.latency_s + config.latency_jitter_s * self._rng.random()
        return config.latency_s

    def _injected_failure(self, config: FakeLMConfig) -> int | None:
        """The status to fail the current completion with, or None; spends the failure budget."""
        if config is not self._config or config.fail_status is None:
            return None
        if self._fail_budget is not None and self._fail_budget <= 0:
            return None
        if config.fail_probability < 1.0 and self._rng.random() >= config.fail_probability:
            return None
        if self._fail_budget is not None:
            self._fail_budget -= 1
        return config.fail_status

    def __repr__(self) -> str:
        return f"<FakeLM {self.url} requests={self.requests}>"


# --- Server -------------------------------------------------------------------------------------------


async def serve_fake_lm(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    config: FakeLMConfig | None = None,
    max_connections: int | None = None,
    task_status: trio.TaskStatus[FakeLM] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a fake OpenAI-compatible LM on ``host:port`` (0: any free port) until cancelled.

    ``fake = await nursery.start(serve_fake_lm)`` returns once the socket is listening, with the
    :class:`FakeLM` whose ``.url`` to give DSPy.
    """
    limit = MAX_CONNECTIONS if max_connections is None else max_connections
    listener = await _open_listener(host, port, max(LISTEN_BACKLOG, limit))
    async with listener:
        bound_host, bound_port = listener.socket.getsockname()[:2]
        fake = FakeLM(bound_host, bound_port, config if config is not None else FakeLMConfig())
        if not is_loopback(bound_host):
            logger.warning(
                "fake LM: listening on %s, not a loopback address: anyone who can reach it can use it "
                "(it has no authentication); bind 127.0.0.1 unless that is what you want",
                fake.base_url,
            )
        limiter = trio.CapacityLimiter(limit)
        async with trio.open_nursery() as nursery:
            fake._cancel_scope = nursery.cancel_scope
            if _close_watch.available():
                watcher = _close_watch.CloseWatcher(partial(_client_gone, fake))
                await nursery.start(watcher.serve)
                fake._close_watcher = watcher
            task_status.started(fake)
            logger.debug("fake LM listening on %s", fake.url)
            while True:
                token = object()
                await limiter.acquire_on_behalf_of(token)
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    limiter.release_on_behalf_of(token)
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        logger.warning("fake LM: accept failed (%s); retrying", exc)
                        await trio.sleep(ACCEPT_RETRY_DELAY_S)
                        continue
                    raise
                except BaseException:
                    limiter.release_on_behalf_of(token)
                    raise
                nursery.start_soon(_connection_task, fake, stream, limiter, token)


def is_loopback(host: str) -> bool:
    """True if the address ``host`` (as a socket reports it, or ``localhost``) only reaches this machine."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


@asynccontextmanager
async def open_fake_lm(host: str = "127.0.0.1", port: int = 0, **config: Any) -> AsyncIterator[FakeLM]:
    """Run a fake LM server for the ``async with`` body; keyword arguments are :class:`FakeLMConfig`
    fields (or pass ``config=FakeLMConfig(...)``), and ``max_connections``."""
    max_connections = config.pop("max_connections", None)
    fake_config = config.pop("config", None) or FakeLMConfig()
    if config:
        fake_config = attrs.evolve(fake_config, **config)
    async with open_service_nursery() as nursery:
        fake: FakeLM = await nursery.start(
            partial(serve_fake_lm, host, port, config=fake_config, max_connections=max_connections)
        )
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


async def _open_listener(host: str, port: int, backlog: int = LISTEN_BACKLOG) -> trio.SocketListener:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _connection_task(
    fake: FakeLM, stream: trio.SocketStream, limiter: trio.CapacityLimiter, token: object
) -> None:
    stats = fake.statistics
    stats.connections_accepted += 1
    stats.connections_open += 1
    try:
        async with stream:
            # Without it, a reply sent in two writes (head, then body) waits for the client's delayed
            # ACK: ~40 ms per call.
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _serve_connection(fake, HttpConnection(stream, server_header=_SERVER_HEADER))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:
        logger.exception("fake LM: connection handler failed")
    finally:
        fake.statistics.connections_open = max(0, fake.statistics.connections_open - 1)
        limiter.release_on_behalf_of(token)


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def _serve_connection(fake: FakeLM, http: HttpConnection) -> None:
    while True:
        try:
            with trio.move_on_after(KEEPALIVE_IDLE_TIMEOUT_S) as idle:
                event = await http.next_event()
            if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            arrived = time.monotonic()  # as early as the server can know it
            fake.statistics.http_requests += 1
            request = event
            length = content_length(request)
            if length is not None and length > MAX_BODY_BYTES:
                raise PayloadTooLarge
            with trio.move_on_after(BODY_READ_TIMEOUT_S) as body_timer:
                body = await http.read_body(MAX_BODY_BYTES)
            if body_timer.cancelled_caught:
                return
        except PayloadTooLarge:
            fake.statistics.rejected_too_large += 1
            message = f"request body larger than {MAX_BODY_BYTES} bytes"
            await http.send_json(413, _error_body(message, "invalid_request_error"), close=True)
            await http.drain_and_close()
            return
        except h11.RemoteProtocolError as exc:
            if http.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            fake.statistics.bad_requests += 1
            status = exc.error_status_hint
            await http.send_json(status, _error_body(str(exc), "invalid_request_error"), close=True)
            await http.drain_and_close()
            return

        keep_going = await _dispatch(fake, http, request, body, arrived)
        if not keep_going or http.h11.our_state is not h11.DONE or http.h11.their_state is not h11.DONE:
            return
        http.h11.start_next_cycle()


_ROUTES: dict[str, str] = {
    "/v1/chat/completions": "POST",
    "/chat/completions": "POST",
    "/v1/models": "GET",
    "/models": "GET",
    "/health": "GET",
    "/v1/health": "GET",
    "/stats": "GET",
    "/v1/stats": "GET",
}


async def _dispatch(
    fake: FakeLM, http: HttpConnection, request: h11.Request, body: bytes, arrived: float
) -> bool:
    """Answer one request; False when the connection must not be reused."""
    method = request.method.decode("ascii", "replace").upper()
    path = request.target.decode("ascii", "replace").split("?", 1)[0].rstrip("/") or "/"
    allowed = _ROUTES.get(path)
    if allowed is None:
        await http.send_json(404, _error_body(f"no route {path}", "invalid_request_error", "not_found"))
        return True
    if method != allowed:
        error = _error_body(f"method {method} not allowed on {path}", "invalid_request_error")
        await http.send_response(405, dumps(error), headers=[(b"allow", allowed.encode())])
        return True
    if path.endswith("/health"):
        await http.send_json(200, {"status": "ok", "requests": fake.requests})
        return True
    if path.endswith("/stats"):  # for a test or benchmark that runs the server in another process
        await http.send_json(200, fake.stats_json())
        return True
    if path.endswith("/models"):
        model = {"id": fake.config.model, "object": "model", "created": 0, "owned_by": "dspex-trio"}
        await http.send_json(200, {"object": "list", "data": [model]})
        return True
    return await _chat_completion(fake, http, body, arrived)


async def _chat_completion(fake: FakeLM, http: HttpConnection, body: bytes, arrived: float) -> bool:
    stats = fake.statistics
    stats.completions_in_flight += 1
    stats.max_completions_in_flight = max(stats.max_completions_in_flight, stats.completions_in_flight)
    fake.arrival_times.append(arrived)
    try:
        return await _answer_completion(fake, http, body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        _client_gone(fake)  # it went away while the answer was being sent
        raise
    finally:
        # The statistics may have been replaced meanwhile (reset_statistics keeps the gauge).
        fake.statistics.completions_in_flight = max(0, fake.statistics.completions_in_flight - 1)


def _client_gone(fake: FakeLM) -> None:
    fake.statistics.client_disconnects += 1
    fake.disconnect_times.append(time.monotonic())


async def _wait_unless_client_leaves(fake: FakeLM, http: HttpConnection, seconds: float) -> bool:
    """Wait ``seconds`` while watching the connection; False (at once, the disconnect counted and
    stamped as soon as it is seen) if the client closed it first.

    The client sends nothing while it waits for its answer (no pipelining), so whatever it sends now is
    dropped; only its end of stream matters. The close is seen by the server's one close watcher
    (``_close_watch``: a thousand disconnects at once are stamped in one pass, before any of their
    tasks unwinds), or where there is none, by this task."""
    watcher = fake._close_watcher
    if watcher is None or not isinstance(http.stream, trio.SocketStream):
        with trio.move_on_after(seconds):
            try:
                await http.wait_for_client_close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            _client_gone(fake)
            return False
        return True
    watch = watcher.watch(http.stream, http)
    try:
        with trio.move_on_after(seconds):
            await watch.gone.wait()
        return not watch.closed  # a close is counted and stamped by the watcher
    finally:
        watcher.unwatch(watch)


async def _answer_completion(fake: FakeLM, http: HttpConnection, body: bytes) -> bool:
    stats = fake.statistics
    stats.completions += 1
    completion_number = stats.completions
    config = fake.config
    try:
        request = parse_chat_request(body)
    except BadRequest as exc:
        stats.bad_requests += 1
        await http.send_json(400, _error_body(f"invalid request: {exc}", "invalid_request_error"))
        return True

    if config.timeout:
        stats.timeouts_injected += 1
        # Never answer; wait for the client to give up (it closes the connection) or for shutdown.
        await http.wait_for_client_close()
        _client_gone(fake)
        return False

    failure = fake._injected_failure(config)
    latency = fake._latency(config)
    if latency > 0 and not await _wait_unless_client_leaves(fake, http, latency):
        return False
    if failure is not None:
        stats.failures_injected += 1
        error_type = "rate_limit_error" if failure == 429 else "server_error" if failure >= 500 else "error"
        payload = dumps(_error_body(f"injected failure {failure}", error_type))
        headers = []
        if config.retry_after_s is not None:
            headers.append((b"retry-after", _seconds_header(config.retry_after_s)))
        await http.send_response(failure, payload, headers=headers)
        return True

    completion_id = f"chatcmpl-fake-{completion_number}"
    created = int(time.time())
    model = request.model or config.model
    try:
        if config.malformed:
            text = MALFORMED_REPLY
        else:
            text = render_reply(request.messages, request.response_format)
        counts = usage(request.messages, text)
        if request.stream:
            events = stream_events(
                completion_id,
                created,
                model,
                text,
                config.stream_chunk_chars,
                counts if request.include_usage else None,
            )
        else:
            reply = dumps(completion_body(completion_id, created, model, text, counts, request.n))
    except RecursionError:  # a schema or message nested past Python's recursion limit
        stats.bad_requests += 1
        error = _error_body("invalid request: nested too deeply to answer", "invalid_request_error")
        await http.send_json(400, error)
        return True
    if config.malformed:
        stats.malformed_served += 1

    if not request.stream:
        await http.send_response(200, reply)
        return True
    stats.streamed += 1
    headers = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"server", _SERVER_HEADER),
    ]
    await http.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
    for i, event in enumerate(events):
        pause = i and config.stream_chunk_delay_s > 0 and i < len(events) - 1
        if pause and not await _wait_unless_client_leaves(fake, http, config.stream_chunk_delay_s):
            return False
        await http.send(h11.Data(data=event))
    await http.send(h11.EndOfMessage())
    return True


def _seconds_header(seconds: float) -> bytes:
    """A ``Retry-After`` value: whole seconds as an integer (the HTTP form), others as a decimal."""
    return (str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}").encode("ascii")


# --- Command line -------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspex-trio fake-lm",
        description="Serve a fake OpenAI-compatible LM (for DSPy's `openai/<model>` client) until Ctrl-C.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument(
        "--model", default="fake", help="model id listed by /v1/models (default: %(default)s)"
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, metavar="SECONDS", help="delay before each answer"
    )
    parser.add_argument(
        "--latency-jitter",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="up to this much more delay per answer, random per request (seeded by --seed)",
    )
    parser.add_argument(
        "--stream-chunk-delay", type=float, default=0.0, metavar="SECONDS", help="delay between SSE chunks"
    )
    parser.add_argument(
        "--fail-status", type=int, default=None, metavar="STATUS", help="answer with this HTTP error"
    )
    parser.add_argument(
        "--fail-count",
        type=int,
        default=None,
        metavar="N",
        help="fail only the first N completions (default: all)",
    )
    parser.add_argument(
        "--fail-probability",
        type=float,
        default=1.0,
        metavar="P",
        help="chance a completion fails (default: 1)",
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="send this Retry-After header with each injected failure",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --fail-probability (default: 0)")
    parser.add_argument("--malformed", action="store_true", help="answer text DSPy cannot parse")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once (default: %(default)s)",
    )
    parser.add_argument("--timeout-mode", action="store_true", help="never answer completions")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dspex-trio fake-lm``: print the server's URL, serve until SIGINT/SIGTERM; returns an exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fake-lm: %(message)s", stream=sys.stderr)
    try:
        config = FakeLMConfig(
            model=args.model,
            latency_s=args.latency,
            latency_jitter_s=args.latency_jitter,
            retry_after_s=args.retry_after,
            stream_chunk_delay_s=args.stream_chunk_delay,
            fail_status=args.fail_status,
            fail_count=args.fail_count,
            fail_probability=args.fail_probability,
            seed=args.seed,
            timeout=args.timeout_mode,
            malformed=args.malformed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        trio.run(_serve_until_signal, args.host, args.port, config, max(1, args.max_connections))
    except OSError as exc:
        print(f"fake-lm: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(host: str, port: int, config: FakeLMConfig, max_connections: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            fake: FakeLM = await nursery.start(
                partial(serve_fake_lm, host, port, config=config, max_connections=max_connections)
            )
            print(fake.url, flush=True)
            async for signum in signals:
                print(f"fake-lm: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
                break
            nursery.cancel_scope.cancel()
