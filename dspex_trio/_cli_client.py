"""The command line as a websocket client of a running server: the connection, ``status``.

``dspex-trio status`` and ``dspex-trio run --url`` speak the websocket API (docs/websocket-api.md) like
any other client. A failure to connect (nothing listening, a refused token, a wrong address) is a
:class:`~dspex_trio._cli_settings.CliError` naming the URL and what to do.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
import trio_websocket

from dspex_trio._cli_settings import CliError, read_secret
from dspex_trio._handshake import SUBPROTOCOL

CLOSE_TIMEOUT_S: Final = 2.0
"""Bound on the closing handshake when a command leaves the server, in s."""
MAX_QUEUED_NOTIFICATIONS: Final = 10_000
"""Notifications held while a command waits for a reply; past it the command fails."""
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
"""Largest message accepted from the server, in bytes."""


_CONNECT_ERRORS: Final = (
    OSError,
    trio_websocket.ConnectionRejected,
    trio_websocket.HandshakeError,
    trio.TooSlowError,
)


class RemoteError(CliError):
    """The server answered a request with an error (``kind`` is its ``data.kind``, when it gave one)."""

    def __init__(self, message: str, *, kind: str | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.data = data


def default_url(environ: Mapping[str, str]) -> str:
    """``ws://DSPEX_HOST:DSPEX_PORT`` (127.0.0.1:8765 by default)."""
    host = environ.get("DSPEX_HOST", "127.0.0.1")
    port = environ.get("DSPEX_PORT", "8765")
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


def client_token(token: str | None, token_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The token a client sends: ``--token``, ``--token-file``, else ``DSPEX_TOKEN``."""
    if token is not None and token_file is not None:
        raise CliError("give the token with --token or --token-file, not both")
    if token_file is not None:
        return read_secret(token_file, "token")
    return token or environ.get("DSPEX_TOKEN") or None


def connect_failure(url: str, exc: BaseException, *, token: bool, timeout: float) -> str:
    """The one line that says why connecting to ``url`` failed, and what to do."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip().splitlines()
        reason = f"HTTP {exc.status_code}" + (f": {body[0]}" if body else "")
        if exc.status_code == 401:
            fix = (
                "check the token you give (--token-file PATH or DSPEX_TOKEN)"
                if token
                else "give the server's token with --token-file PATH or DSPEX_TOKEN"
            )
        elif exc.status_code in (429, 503):
            fix = "try again later"
        else:
            fix = "is this the address of a dspex-trio server?"
        return f"{url} refused the connection ({reason}): {fix}"
    if isinstance(exc, trio.TooSlowError):
        return f"no answer from {url} within {timeout:g} s: is this the address of a dspex-trio server?"
    if isinstance(exc, OSError):
        return (
            f"cannot connect to {url}: {_os_reason(exc)}: start the server (dspex-trio serve), "
            "or give its address with --url"
        )
    if isinstance(exc, trio_websocket.HandshakeError):
        return f"cannot open a websocket to {url} ({exc or type(exc).__name__}): is it a dspex-trio server?"
    return f"cannot connect to {url}: {exc}"


def _os_reason(exc: OSError) -> str:
    """``Connection refused`` rather than trio's "all attempts to connect to ... failed" (whose causes,
    one per address tried, are in ``__cause__``)."""
    if exc.strerror:
        return exc.strerror
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return str(exc)


class RpcClient:
    """JSON-RPC 2.0 over one websocket, one request at a time; notifications are queued meanwhile."""

    def __init__(self, url: str, ws: trio_websocket.WebSocketConnection) -> None:
        self.url = url
        self.ws = ws
        self._next_id = 1
        self._queued: collections.deque[dict[str, Any]] = collections.deque()

    async def request_message(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send a request; its reply message (``result`` or ``error``), as received."""
        request_id = self._next_id
        self._next_id += 1
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": dict(params or {})}
        try:
            await self.ws.send_message(json.dumps(message))
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed(exc) from None
        while True:
            reply = await self._receive()
            if reply.get("id") == request_id:
                return reply
            if "method" in reply:
                if len(self._queued) >= MAX_QUEUED_NOTIFICATIONS:
                    raise CliError(f"{self.url} sent over {MAX_QUEUED_NOTIFICATIONS} notifications unread")
                self._queued.append(reply)

    async def request(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send a request and return its result. Raises :class:`RemoteError` for an error reply."""
        reply = await self.request_message(method, params)
        if "error" in reply:
            error = reply["error"]
            data = error.get("data") if isinstance(error.get("data"), dict) else None
            raise RemoteError(
                f"{method}: {error.get('message')}", kind=(data or {}).get("kind"), data=error.get("data")
            )
        return reply.get("result")

    async def notification(self) -> dict[str, Any]:
        """The next notification message (``{"jsonrpc", "method", "params"}``)."""
        if self._queued:
            return self._queued.popleft()
        while True:
            message = await self._receive()
            if "method" in message:
                return message

    async def _receive(self) -> dict[str, Any]:
        try:
            text = await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed(exc) from None
        message = json.loads(text)
        if not isinstance(message, dict):
            raise CliError(f"{self.url} sent something that is not a JSON-RPC message")
        return message

    def _closed(self, exc: trio_websocket.ConnectionClosed) -> CliError:
        reason = exc.reason
        if reason is None:
            return CliError(f"{self.url} closed the connection")
        text = f"{reason.code} {reason.reason}" if reason.reason else str(reason.code)
        return CliError(f"{self.url} closed the connection ({text})")


@asynccontextmanager
async def open_rpc(url: str, token: str | None, *, timeout: float) -> AsyncIterator[RpcClient]:
    """A connection to the server at ``url`` (subprotocol ``dspex.v1``), closed on the way out.

    Raises:
        CliError: the server cannot be reached, refused the connection, or did not answer in ``timeout`` s.
    """
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    connected = False
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(timeout):
                    ws = await trio_websocket.connect_websocket_url(
                        nursery,
                        url,
                        subprotocols=[SUBPROTOCOL],
                        extra_headers=headers,
                        max_message_size=MAX_MESSAGE_BYTES,
                    )
            except ValueError as exc:  # not a ws:// or wss:// URL
                raise CliError(f"--url {url}: {exc}") from None
            except _CONNECT_ERRORS as exc:
                raise CliError(connect_failure(url, exc, token=token is not None, timeout=timeout)) from exc
            connected = True
            try:
                yield RpcClient(url, ws)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # a refusal is raised by the connection's reader task, so it comes out of the nursery
        failed = None if connected or group.subgroup(KeyboardInterrupt) else group.subgroup(_CONNECT_ERRORS)
        if failed is None:
            raise
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise CliError(connect_failure(url, first, token=token is not None, timeout=timeout)) from group


# -- status ------------------------------------------------------------------------------------------------


def describe_snapshot(snapshot: Mapping[str, Any]) -> str:
    lines = [
        f"pool: {len(snapshot['workers'])}/{snapshot['size']} workers, circuit {snapshot['circuit']}"
        + (f" ({snapshot['circuit_reason']})" if snapshot.get("circuit_reason") else "")
        + f", launcher {snapshot['launcher']}, restarts {snapshot['restarts']}"
    ]
    for w in snapshot["workers"]:
        lines.append(
            f"  {w['worker_id']:<8} pid {w['pid']:<8} {w['state']:<9} in flight {w['in_flight']:<4}"
            f" last heard {w['last_heartbeat_age']:.2f} s ago"
            + (" (retiring)" if w["retiring"] else "")
            + (f" on node {w['node']}" if w.get("node") else "")
        )
    return "\n".join(lines)


def describe_event(event: str, data: Mapping[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(data.get("time", time.time())))
    if event == "worker_state":
        where = f" on node {data['node']}" if data.get("node") else ""
        return (
            f"{stamp} worker {data['worker_id']} (pid {data['pid']}{where}): {data['from']} -> {data['to']}"
            + (f" ({data['reason']})" if data.get("reason") else "")
        )
    if event == "circuit":
        return f"{stamp} circuit {data['from']} -> {data['to']}" + (
            f" ({data['reason']})" if data.get("reason") else ""
        )
    if event == "lagged":
        return f"{stamp} missed {data.get('missed')} events; resyncing"
    if event == "snapshot":
        return describe_snapshot(data)
    return f"{stamp} {event} {json.dumps(dict(data))}"


async def status(url: str | None, token: str | None, *, once: bool, raw_json: bool, timeout: float) -> int:
    """``dspex-trio status``: the server's health snapshot, then its health events until Ctrl-C."""
    url = url or default_url(os.environ)
    async with open_rpc(url, token, timeout=timeout) as client:
        with trio.fail_after(timeout):
            reply = await client.request_message("health/subscribe")
        if raw_json:
            print(json.dumps(reply), flush=True)
        if "error" in reply:
            raise RemoteError(f"health/subscribe: {reply['error'].get('message')}")
        if not raw_json:
            print(describe_snapshot(reply["result"]["snapshot"]), flush=True)
        if once:
            return 0
        while True:
            message = await client.notification()
            if raw_json:
                print(json.dumps(message), flush=True)
            elif message.get("method") == "health/event":
                params = message["params"]
                print(describe_event(params["event"], params["data"]), flush=True)
