"""A small OpenAI-compatible chat server on 127.0.0.1 that records every request's headers, for the LM
security tests: what did the worker actually send, and to whom.

A ``ThreadingHTTPServer`` in a thread (the tests are Trio tests; the server must answer while a test
task awaits a worker). Each ``POST .../chat/completions`` is recorded, then answered by the next
scripted reply (``script``: a status with headers, e.g. 429 with ``Retry-After``) or, when the script
is empty, with a ChatAdapter answer for a ``question -> answer`` signature (SSE when ``stream`` is set).
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = "Forty-two."
HOLD_LIMIT_S = 30.0
REPLY = f"[[ ## answer ## ]]\n{ANSWER}\n\n[[ ## completed ## ]]"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-case names."""
    body: dict[str, Any]

    def raw(self) -> str:
        """Everything the client sent, as one string (to search for a secret)."""
        return (
            f"{self.method} {self.path}\n"
            + "\n".join(f"{k}: {v}" for k, v in self.headers.items())
            + ("\n" + json.dumps(self.body))
        )


@dataclass(frozen=True)
class Reply:
    """A scripted answer: ``status`` with ``headers`` and a JSON ``body``; or, with ``text``, a normal
    completion (JSON, or SSE for a streamed request) whose content is ``text``."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=lambda: {"error": {"message": "scripted failure"}})
    text: str | None = None
    hold: threading.Event | None = None
    """Answer only once this is set (at most ``HOLD_LIMIT_S``): a request the test keeps in flight."""


class RecordingLM:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: collections.deque[Reply] = collections.deque()
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                recorder._record(self, {})
                self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = {"unparsed": raw.decode("utf-8", "replace")}
                reply = recorder._record(self, body)
                if reply is not None and reply.hold is not None:
                    reply.hold.wait(HOLD_LIMIT_S)
                if reply is not None and reply.text is None:
                    self._json(reply.status, reply.body, reply.headers)
                    return
                text = REPLY if reply is None or reply.text is None else reply.text
                if body.get("stream"):
                    self._stream(body, text)
                else:
                    self._json(200, _completion(body, text))

            def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict[str, Any], text: str) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
                for delta in [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces]:
                    self._event(_chunk(body, delta, None))
                self._event(_chunk(body, {}, "stop"))
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def _event(self, obj: Any) -> None:
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-lm", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """An ``api_base`` for it."""
        return f"http://127.0.0.1:{self.port}/v1"

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def _record(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> Reply | None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            self.requests.append(Recorded(handler.command, handler.path, headers, body))
            return self.script.popleft() if self.script else None

    def everything_sent(self) -> str:
        with self._lock:
            return "\n".join(r.raw() for r in self.requests)


def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-recorded",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "x"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-recorded",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": body.get("model", "x"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


@contextmanager
def recording_lm() -> Iterator[RecordingLM]:
    server = RecordingLM()
    server._thread.start()
    try:
        yield server
    finally:
        server._server.shutdown()
        server._server.server_close()
        server._thread.join(timeout=5)
