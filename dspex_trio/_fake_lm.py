"""A fake OpenAI-compatible LM server on Trio and h11, for tests and benchmarks.

DSPy's own HTTP client (``dspy.LM("openai/<model>", api_base=url, api_key="x")``) talks to it exactly as
it would to a real provider, so a test exercises DSPy's real network path (request building, SSE
streaming, error mapping, connection reuse) with no LLM API and no network.

Answers are deterministic. The server reads the output field names (and their types, when listed) from
the system message DSPy's ChatAdapter writes (``1. `answer` (str): ...``) and answers in the same format
(``[[ ## answer ## ]]\\n...\\n\\n[[ ## completed ## ]]``), with values derived from a hash of the last user
message: a short sentence for a ``str``, a number for an ``int``/``float``, one of the choices of a
``Literal``, a value built from the JSON schema DSPy prints for structured types. A JSONAdapter prompt (or
a request with ``response_format``) gets a JSON object instead; a prompt with no output fields gets plain
text.

Faults are injected through :class:`FakeLMConfig` (latency, HTTP error statuses for the next N requests
or with a seeded probability, answers that never come, answers DSPy cannot parse); a running server's
config can be replaced at any time (:attr:`FakeLM.config`, :meth:`FakeLM.configure`).

Endpoints: ``POST /v1/chat/completions`` (JSON, or SSE with ``"stream": true``), ``GET /v1/models``,
``GET /health``. The same paths without the ``/v1`` prefix are accepted too.
"""

from __future__ import annotations

import argparse
import ast
import errno
import hashlib
import json
import logging
import math
import random
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from http import HTTPStatus
from typing import Any

import attrs
import h11
import trio

from dspex_trio._util import open_service_nursery

logger = logging.getLogger(__name__)

# --- Limits -------------------------------------------------------------------------------------------

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body accepted, in bytes; a larger one gets ``413 Payload Too Large``."""

MAX_HEADER_BYTES = 64 * 1024
"""Largest request head (request line and headers), in bytes; a larger one gets ``431``."""

MAX_CONNECTIONS = 256
"""Connections served at once, a count; further clients wait in the listen backlog."""

LISTEN_BACKLOG = 128
"""Pending connections the kernel queues for ``accept``, a count."""

RECEIVE_CHUNK_BYTES = 64 * 1024
"""Bytes read from a socket per ``receive_some`` call."""

KEEPALIVE_IDLE_TIMEOUT_S = 60.0
"""Seconds an idle keep-alive connection may wait for its next request before the server closes it."""

BODY_READ_TIMEOUT_S = 30.0
"""Seconds allowed to read a request body once its head has arrived; the connection is closed after."""

LINGER_TIMEOUT_S = 1.0
"""After an error reply that closes the connection, seconds spent draining the unread request, so the
client reads the reply instead of a connection reset."""

LINGER_MAX_BYTES = 16 * 1024 * 1024
"""Most bytes drained from a client after an error reply that closes the connection."""

ACCEPT_RETRY_DELAY_S = 0.1
"""Seconds to wait before accepting again when the process is out of file descriptors or memory."""

_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

MAX_SCHEMA_DEPTH = 8
"""Deepest nesting followed when building a value from a JSON schema or a type expression."""

SNIPPET_MAX_WORDS = 6
"""Words of the first input value quoted in a generated sentence."""

SNIPPET_MAX_CHARS = 48
"""Characters of the first input value quoted in a generated sentence."""

MALFORMED_REPLY = "Sorry, I will not follow the requested output format this time."
"""Reply text sent when :attr:`FakeLMConfig.malformed` is set: neither ChatAdapter nor JSONAdapter format."""

_SERVER_HEADER = b"dspex-trio-fake-lm"


# --- Configuration and statistics ---------------------------------------------------------------------


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


def _http_error_status(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 400 <= value <= 599:
        raise ValueError(f"{attribute.name} must be an HTTP error status (400-599), not {value!r}")


def _optional_count(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0 or None, not {value!r}")


def _probability(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be within [0, 1], not {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, not {value!r}")


@attrs.frozen(kw_only=True)
class FakeLMConfig:
    """How a fake LM server answers chat completions (``/health`` and ``/v1/models`` are never faulted).

    Faults are checked in this order: ``timeout``, then ``fail_status``, then ``malformed``.
    """

    model: str = "fake"
    """Model id listed by ``/v1/models`` (completions echo the model the client asked for)."""

    latency_s: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds to wait before answering a completion (an injected error too)."""

    stream_chunk_delay_s: float = attrs.field(default=0.0, validator=_non_negative)
    """Seconds to wait between two SSE chunks of a streamed answer."""

    stream_chunk_chars: int = attrs.field(default=8, validator=_positive)
    """Characters of answer text per SSE chunk (real providers send a token or a few per chunk)."""

    fail_status: int | None = attrs.field(default=None, validator=_http_error_status)
    """HTTP status (such as 429 or 500) to answer completions with instead of a reply; None: no failures."""

    fail_count: int | None = attrs.field(default=None, validator=_optional_count)
    """How many completions fail with ``fail_status`` (counted from when this config was installed);
    None: no limit."""

    fail_probability: float = attrs.field(default=1.0, validator=_probability)
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
    connections_open: int = 0


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
        open_now = self.statistics.connections_open
        self.statistics = FakeLMStatistics(connections_open=open_now)

    def stop(self) -> None:
        """Stop serving: :func:`serve_fake_lm` closes its listener and connections and returns."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

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
    task_status: trio.TaskStatus[FakeLM] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a fake OpenAI-compatible LM on ``host:port`` (0: any free port) until cancelled.

    ``fake = await nursery.start(serve_fake_lm)`` returns once the socket is listening, with the
    :class:`FakeLM` whose ``.url`` to give DSPy.
    """
    listener = await _open_listener(host, port)
    async with listener:
        bound_host, bound_port = listener.socket.getsockname()[:2]
        fake = FakeLM(bound_host, bound_port, config if config is not None else FakeLMConfig())
        limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
        async with trio.open_nursery() as nursery:
            fake._cancel_scope = nursery.cancel_scope
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


@asynccontextmanager
async def open_fake_lm(host: str = "127.0.0.1", port: int = 0, **config: Any) -> AsyncIterator[FakeLM]:
    """Run a fake LM server for the ``async with`` body; keyword arguments are :class:`FakeLMConfig`
    fields (or pass ``config=FakeLMConfig(...)``)."""
    fake_config = config.pop("config", None) or FakeLMConfig()
    if config:
        fake_config = attrs.evolve(fake_config, **config)
    async with open_service_nursery() as nursery:
        fake: FakeLM = await nursery.start(partial(serve_fake_lm, host, port, config=fake_config))
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


async def _open_listener(host: str, port: int) -> trio.SocketListener:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
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
            await _serve_connection(fake, _HttpConnection(stream))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:
        logger.exception("fake LM: connection handler failed")
    finally:
        fake.statistics.connections_open = max(0, fake.statistics.connections_open - 1)
        limiter.release_on_behalf_of(token)


class _PayloadTooLarge(Exception):
    pass


class _HttpConnection:
    """One server-side HTTP/1.1 connection: an h11 state machine over a Trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                if self.h11.they_are_waiting_for_100_continue:
                    await self.send(h11.InformationalResponse(status_code=100, headers=[]))
                self.h11.receive_data(await self.stream.receive_some(RECEIVE_CHUNK_BYTES))
                continue
            return event

    async def read_body(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise _PayloadTooLarge
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in a request body")

    async def send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def send_response(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"application/json",
        headers: Sequence[tuple[bytes, bytes]] = (),
        close: bool = False,
    ) -> None:
        all_headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"server", _SERVER_HEADER),
            *headers,
        ]
        if close:
            all_headers.append((b"connection", b"close"))
        # Head and body in one write: one segment, no Nagle/delayed-ACK interplay at all.
        data = (
            self.h11.send(h11.Response(status_code=status, headers=all_headers, reason=_reason(status)))
            or b""
        )
        if body:
            data += self.h11.send(h11.Data(data=body)) or b""
        data += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def send_json(self, status: int, obj: Any, *, close: bool = False) -> None:
        await self.send_response(status, _dumps(obj), close=close)

    async def wait_for_client_close(self) -> None:
        """Read (and drop) whatever the client sends until it closes its side (or the server stops)."""
        while await self.stream.receive_some(RECEIVE_CHUNK_BYTES):
            pass

    async def drain_and_close(self) -> None:
        """Half-close our side, then read (and drop) what the client still sends until it closes, the
        timeout passes or :data:`LINGER_MAX_BYTES` were read."""
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        with trio.move_on_after(LINGER_TIMEOUT_S):
            drained = 0
            while drained < LINGER_MAX_BYTES:
                data = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
                if not data:
                    return
                drained += len(data)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def _serve_connection(fake: FakeLM, http: _HttpConnection) -> None:
    while True:
        try:
            with trio.move_on_after(KEEPALIVE_IDLE_TIMEOUT_S) as idle:
                event = await http.next_event()
            if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            fake.statistics.http_requests += 1
            request = event
            length = _content_length(request)
            if length is not None and length > MAX_BODY_BYTES:
                raise _PayloadTooLarge
            with trio.move_on_after(BODY_READ_TIMEOUT_S) as body_timer:
                body = await http.read_body(MAX_BODY_BYTES)
            if body_timer.cancelled_caught:
                return
        except _PayloadTooLarge:
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

        keep_going = await _dispatch(fake, http, request, body)
        if not keep_going or http.h11.our_state is not h11.DONE or http.h11.their_state is not h11.DONE:
            return
        http.h11.start_next_cycle()


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


_ROUTES: dict[str, str] = {
    "/v1/chat/completions": "POST",
    "/chat/completions": "POST",
    "/v1/models": "GET",
    "/models": "GET",
    "/health": "GET",
    "/v1/health": "GET",
}


async def _dispatch(fake: FakeLM, http: _HttpConnection, request: h11.Request, body: bytes) -> bool:
    """Answer one request; False when the connection must not be reused."""
    method = request.method.decode("ascii", "replace").upper()
    path = request.target.decode("ascii", "replace").split("?", 1)[0].rstrip("/") or "/"
    allowed = _ROUTES.get(path)
    if allowed is None:
        await http.send_json(404, _error_body(f"no route {path}", "invalid_request_error", "not_found"))
        return True
    if method != allowed:
        error = _error_body(f"method {method} not allowed on {path}", "invalid_request_error")
        await http.send_response(405, _dumps(error), headers=[(b"allow", allowed.encode())])
        return True
    if path.endswith("/health"):
        await http.send_json(200, {"status": "ok", "requests": fake.requests})
        return True
    if path.endswith("/models"):
        model = {"id": fake.config.model, "object": "model", "created": 0, "owned_by": "dspex-trio"}
        await http.send_json(200, {"object": "list", "data": [model]})
        return True
    return await _chat_completion(fake, http, body)


async def _chat_completion(fake: FakeLM, http: _HttpConnection, body: bytes) -> bool:
    stats = fake.statistics
    stats.completions += 1
    completion_number = stats.completions
    config = fake.config
    try:
        payload = json.loads(body)
        if not isinstance(payload, dict):
            raise ValueError("the request body must be a JSON object")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("`messages` must be a list of message objects")
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        stats.bad_requests += 1
        await http.send_json(400, _error_body(f"invalid request: {exc}", "invalid_request_error"))
        return True

    if config.timeout:
        stats.timeouts_injected += 1
        # Never answer; wait for the client to give up (it closes the connection) or for shutdown.
        await http.wait_for_client_close()
        return False

    failure = fake._injected_failure(config)
    if config.latency_s > 0:
        await trio.sleep(config.latency_s)
    if failure is not None:
        stats.failures_injected += 1
        error_type = "rate_limit_error" if failure == 429 else "server_error" if failure >= 500 else "error"
        await http.send_json(failure, _error_body(f"injected failure {failure}", error_type))
        return True

    if config.malformed:
        stats.malformed_served += 1
        text = MALFORMED_REPLY
    else:
        text = render_reply(messages, payload.get("response_format"))

    model = str(payload.get("model") or config.model)
    completion_id = f"chatcmpl-fake-{completion_number}"
    created = int(time.time())
    usage = {
        "prompt_tokens": _token_estimate(_messages_text(messages)),
        "completion_tokens": _token_estimate(text),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

    if payload.get("stream"):
        stats.streamed += 1
        stream_options = payload.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        await _send_stream(
            http, config, completion_id, created, model, text, usage if include_usage else None
        )
        return True

    choices_n = payload.get("n")
    n = choices_n if isinstance(choices_n, int) and 1 <= choices_n <= 16 else 1
    response = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
        "usage": usage,
    }
    await http.send_json(200, response)
    return True


async def _send_stream(
    http: _HttpConnection,
    config: FakeLMConfig,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    usage: dict[str, int] | None,
) -> None:
    headers = [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"server", _SERVER_HEADER),
    ]
    await http.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    events: list[dict[str, Any]] = [chunk({"role": "assistant", "content": ""}, None)]
    size = config.stream_chunk_chars
    events += [chunk({"content": text[i : i + size]}, None) for i in range(0, len(text), size)]
    events.append(chunk({}, "stop"))
    if usage is not None:
        events.append({**chunk({}, None), "choices": [], "usage": usage})
    for i, event in enumerate(events):
        if i and config.stream_chunk_delay_s > 0:
            await trio.sleep(config.stream_chunk_delay_s)
        await http.send(h11.Data(data=b"data: " + _dumps(event) + b"\n\n"))
    await http.send(h11.Data(data=b"data: [DONE]\n\n"))
    await http.send(h11.EndOfMessage())


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _token_estimate(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


# --- Answers ------------------------------------------------------------------------------------------


@attrs.frozen
class OutputField:
    """An output field read from a DSPy prompt."""

    name: str
    type_expr: str | None = None
    """The type as DSPy prints it (``int``, ``list[str]``, ``Literal['a', 'b']``), if listed."""
    json_schema: dict[str, Any] | None = None
    """The JSON schema DSPy gives for structured types (lists, dicts, models), if any."""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(
        content, list
    ):  # content parts: [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _messages_text(messages: list[dict[str, Any]]) -> str:
    return "\n".join(_content_text(m.get("content")) for m in messages)


_FIELD_LINE = re.compile(r"^\d+\. `(?P<name>[^`\n]+)` \(", re.MULTILINE)
_NOTE_SCHEMA = "# note: the value you produce must adhere to the JSON schema: "
_CHAT_NOTE = re.compile(
    r"^\[\[ ## (?P<name>[^\n]+?) ## \]\]\n\{(?P=name)\}[ \t]*" + re.escape(_NOTE_SCHEMA) + r"(?P<schema>.*)$",
    re.MULTILINE,
)
_JSON_OUTPUTS_MARK = "Outputs will be a JSON object with the following fields."
_RESPOND_FIELD = re.compile(
    r"`\[\[ ## (?P<name>[^`\n]+?) ## \]\]`(?: \(must be formatted as a valid Python (?P<type>[^\n]*?)\))?(?=,|\s+and\b|$)"
)
_INPUT_BLOCK = re.compile(
    r"^\[\[ ## (?P<name>[^\n]+?) ## \]\]\n(?P<value>.*?)(?=^\[\[ ## |\Z)", re.MULTILINE | re.DOTALL
)


def _scan_type(text: str, start: int) -> tuple[str, int] | None:
    """The type expression starting at ``text[start]`` and ending at its closing ``)``, bracket and quote
    aware (so ``Literal['a)', 'b']`` works); returns (type, index after the ``)``)."""
    depth = 0
    quote: str | None = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            if depth == 0:
                return (text[start:i], i + 1) if ch == ")" else None
            depth -= 1
        elif ch == "\n":
            return None
        i += 1
    return None


def parse_output_fields(messages: list[dict[str, Any]]) -> list[OutputField]:
    """The output fields a DSPy (Chat/JSON adapter) prompt asks for, in order; empty if none are found."""
    system = "\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "system")
    fields: list[OutputField] = []
    marker = system.find("Your output fields are:")
    if marker >= 0:
        section_end = system.find("All interactions will be structured", marker)
        section = system[marker : section_end if section_end >= 0 else len(system)]
        for match in _FIELD_LINE.finditer(section):
            scanned = _scan_type(section, match.end())
            type_expr = scanned[0].strip() if scanned else None
            fields.append(OutputField(match.group("name"), type_expr or None))
    if not fields:
        fields = _fields_from_user_message(messages)
    if not fields:
        return []
    schemas = _schema_notes(system)
    return [attrs.evolve(f, json_schema=schemas.get(f.name)) for f in fields]


def _fields_from_user_message(messages: list[dict[str, Any]]) -> list[OutputField]:
    user = _last_user_text(messages)
    at = user.rfind("Respond with the corresponding output fields")
    if at < 0:
        return []
    fields = []
    for match in _RESPOND_FIELD.finditer(user, at):
        if match.group("name") != "completed":
            fields.append(OutputField(match.group("name"), match.group("type")))
    return fields


def _schema_notes(system: str) -> dict[str, dict[str, Any]]:
    notes: dict[str, str] = {m.group("name"): m.group("schema") for m in _CHAT_NOTE.finditer(system)}
    json_at = system.find(_JSON_OUTPUTS_MARK)
    if json_at >= 0:  # JSONAdapter: the skeleton is a JSON object of field -> "{field}  # note: ..."
        brace = system.find("{", json_at)
        try:
            skeleton, _ = json.JSONDecoder().raw_decode(system, brace)
        except ValueError:
            skeleton = None
        if isinstance(skeleton, dict):
            for name, template in skeleton.items():
                if isinstance(template, str) and _NOTE_SCHEMA in template:
                    notes[name] = template.split(_NOTE_SCHEMA, 1)[1]
    schemas: dict[str, dict[str, Any]] = {}
    for name, text in notes.items():
        try:
            schema = json.loads(text)
        except ValueError:
            continue
        if isinstance(schema, dict):
            schemas[name] = schema
    return schemas


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _wants_json(messages: list[dict[str, Any]], response_format: Any) -> bool:
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return True
    return any(
        m.get("role") == "system" and _JSON_OUTPUTS_MARK in _content_text(m.get("content")) for m in messages
    )


def _snippet(user_text: str) -> str:
    """A few words of the first input value, free of ``[[``/``]]`` and braces that could confuse a parser."""
    match = _INPUT_BLOCK.search(user_text)
    value = match.group("value") if match else user_text
    value = re.split(r"\n\s*\nRespond with ", value, maxsplit=1)[0]
    words = re.sub(r"[\[\]{}`\"\\]", " ", value).split()
    snippet = " ".join(words[:SNIPPET_MAX_WORDS])[:SNIPPET_MAX_CHARS].strip()
    return snippet or "the input"


class _ValueMaker:
    """Builds deterministic values for one answer (seeded by the last user message)."""

    def __init__(self, user_text: str) -> None:
        self.user_text = user_text
        self.snippet = _snippet(user_text)

    def _number(self, name: str, salt: str = "") -> int:
        digest = hashlib.sha256(f"{self.user_text}\0{name}\0{salt}".encode()).digest()
        return int.from_bytes(digest[:8], "big")

    def sentence(self, name: str) -> str:
        if name == "reasoning":
            return f"Let me think step by step about {self.snippet}, then give the answer."
        label = name.replace("_", " ").capitalize()
        return f"{label} {self._number(name) % 1000} is a fake reply about {self.snippet}."

    def for_field(self, field: OutputField) -> Any:
        if field.json_schema is not None:  # exact for lists, dicts and models: prefer it to the type
            return self.from_schema(field.json_schema, field.json_schema, field.name, 0)
        if field.type_expr:
            try:
                tree = ast.parse(field.type_expr, mode="eval").body
            except SyntaxError:
                tree = None
            if tree is not None:
                return self.from_type(tree, field.name, 0)
        if field.json_schema is not None:
            return self.from_schema(field.json_schema, field.json_schema, field.name, 0)
        return self.sentence(field.name)

    def from_type(self, node: ast.expr, name: str, depth: int) -> Any:
        """A value of the type expression ``node`` (as DSPy prints types); unknown names get a sentence."""
        if depth > MAX_SCHEMA_DEPTH or _is_none(node):
            return None
        h = self._number(name, str(depth))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | None
            return self.from_type(node.right if _is_none(node.left) else node.left, name, depth + 1)
        if isinstance(node, ast.Name | ast.Attribute):
            type_name = node.id if isinstance(node, ast.Name) else node.attr
            if type_name == "int":
                return h % 100
            if type_name == "float":
                return (h % 10000) / 100
            if type_name == "bool":
                return h % 2 == 0
            if type_name == "list":
                return [self.sentence(f"{name} 1"), self.sentence(f"{name} 2")]
            if type_name == "dict":
                return {"key": self.sentence(name)}
            return self.sentence(name)
        if isinstance(node, ast.Subscript):
            base = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", "")
            args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
            if base == "Literal":
                choices = [a.value for a in args if isinstance(a, ast.Constant)]
                return choices[h % len(choices)] if choices else None
            if base in ("Optional", "Union"):
                non_none = [a for a in args if not _is_none(a)]
                return self.from_type(non_none[0], name, depth + 1) if non_none else None
            if base in ("list", "List", "Sequence", "set", "Set", "frozenset"):
                values = [self.from_type(args[0], f"{name} {i}", depth + 1) for i in (1, 2)]
                return values if values[0] != values[1] else values[:1]
            if base in ("tuple", "Tuple"):
                if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
                    args = args[:1]
                return [self.from_type(a, f"{name} {i}", depth + 1) for i, a in enumerate(args)]
            if base in ("dict", "Dict", "Mapping") and len(args) == 2:
                key = self.from_type(args[0], f"{name} key", depth + 1)
                key = key if isinstance(key, str) else json.dumps(key)
                return {key: self.from_type(args[1], f"{name} value", depth + 1)}
        return self.sentence(name)

    def from_schema(self, schema: Any, root: dict[str, Any], name: str, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > MAX_SCHEMA_DEPTH:
            return None
        h = self._number(name, f"schema{depth}")
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            target: Any = root
            for part in ref[2:].split("/"):
                target = target.get(part) if isinstance(target, dict) else None
            return self.from_schema(target, root, name, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][h % len(schema["enum"])]
        if "default" in schema and schema["default"] is not None:
            return schema["default"]
        for key in ("anyOf", "oneOf", "allOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
                return self.from_schema((non_null or options)[0], root, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties")
            if isinstance(properties, dict) and properties:
                return {
                    key: self.from_schema(sub, root, f"{name}.{key}", depth + 1)
                    for key, sub in properties.items()
                }
            extra = schema.get("additionalProperties")
            return (
                {"key": self.from_schema(extra, root, f"{name}.key", depth + 1)}
                if isinstance(extra, dict)
                else {}
            )
        if kind == "array":
            count = max(2, int(schema.get("minItems", 0) or 0))
            return [
                self.from_schema(schema.get("items", {}), root, f"{name} {i}", depth + 1)
                for i in range(count)
            ]
        if kind == "integer":
            return h % 100
        if kind == "number":
            return (h % 10000) / 100
        if kind == "boolean":
            return h % 2 == 0
        if kind == "null":
            return None
        return self.sentence(name)


def _is_none(node: ast.expr) -> bool:
    return (isinstance(node, ast.Constant) and node.value is None) or (
        isinstance(node, ast.Name) and node.id == "None"
    )


def _chat_value(value: Any) -> str:
    """A value as the ChatAdapter expects it between field markers."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def render_reply(messages: list[dict[str, Any]], response_format: Any = None) -> str:
    """The deterministic reply to a chat request: ChatAdapter fields, a JSON object, or plain text."""
    user_text = _last_user_text(messages)
    maker = _ValueMaker(user_text)
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return json.dumps(maker.from_schema(schema, schema, "response", 0), ensure_ascii=False)
    fields = parse_output_fields(messages)
    if not fields:
        if _wants_json(messages, response_format):
            return json.dumps({"answer": maker.sentence("answer")})
        return f"This is a fake reply to: {maker.snippet}."
    values = {f.name: maker.for_field(f) for f in fields}
    if _wants_json(messages, response_format):
        return json.dumps(values, ensure_ascii=False)
    parts = [f"[[ ## {name} ## ]]\n{_chat_value(value)}" for name, value in values.items()]
    return "\n\n".join([*parts, "[[ ## completed ## ]]"])


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
    parser.add_argument("--seed", type=int, default=0, help="seed for --fail-probability (default: 0)")
    parser.add_argument("--malformed", action="store_true", help="answer text DSPy cannot parse")
    parser.add_argument("--timeout-mode", action="store_true", help="never answer completions")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dspex-trio fake-lm``: print the server's URL, serve until SIGINT/SIGTERM; returns an exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        config = FakeLMConfig(
            model=args.model,
            latency_s=args.latency,
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
        trio.run(_serve_until_signal, args.host, args.port, config)
    except OSError as exc:
        print(f"fake-lm: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(host: str, port: int, config: FakeLMConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            fake: FakeLM = await nursery.start(partial(serve_fake_lm, host, port, config=config))
            print(fake.url, flush=True)
            async for signum in signals:
                print(f"fake-lm: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
                break
            nursery.cancel_scope.cancel()
