"""The websocket server's options: every limit, with its unit, set by the operator."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from typing import Any

import attrs

from dspex_trio._client_lm import CLIENT_LM_MODES, ClientLM, ClientLMPolicy
from dspex_trio._handshake import normalize_origin
from dspex_trio._validators import non_negative, positive


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("expected a list of strings, not one string")
    return tuple(value)


def _origins(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for origin in value:
        if normalize_origin(origin) is None:
            raise ValueError(
                f"{attribute.name}: {origin!r} is not an origin: write scheme://host[:port], e.g. "
                "https://app.example.com"
            )


def _bases(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for base in value:
        try:
            parts = urllib.parse.urlsplit(base)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"{attribute.name}: {base!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise ValueError(
                f"{attribute.name}: {base!r} must be an http(s) URL with a host and no credentials"
            )


def _mode(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in CLIENT_LM_MODES:
        raise ValueError(f"{attribute.name} must be one of {', '.join(CLIENT_LM_MODES)}, not {value!r}")


@attrs.frozen(kw_only=True)
class WebsocketOptions:
    """Limits and policies of the websocket server. Counts are per connection unless they say otherwise."""

    # -- the handshake and connections ------------------------------------------------------------------
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=_strings, validator=_origins)
    """Browser origins (``scheme://host[:port]``) allowed besides loopback pages (see docs/security.md)."""
    max_connections: int = attrs.field(default=1024, validator=positive)
    """Connections served at once (server-wide); one more is refused at the handshake with HTTP 503."""
    max_connections_per_peer: int = attrs.field(default=256, validator=positive)
    """Connections at once from one peer address; one more is refused with HTTP 429. Behind a proxy every
    client has the proxy's address: raise it there."""
    handshake_timeout: float = attrs.field(default=10.0, validator=positive)
    """Seconds a client has to complete the opening handshake."""
    close_timeout: float = attrs.field(default=2.0, validator=positive)
    """Seconds allowed for the closing handshake (and a write in progress) before the TCP connection is
    dropped."""
    idle_timeout: float = attrs.field(default=300.0, validator=positive)
    """Seconds a connection may go without a message from its client while it has no execution and no
    health subscription; then it is closed (1001)."""
    ping_interval: float = attrs.field(default=20.0, validator=positive)
    """Seconds between websocket pings the server sends to check that the client is there."""
    ping_timeout: float = attrs.field(default=20.0, validator=positive)
    """Seconds a ping may go unanswered before the connection is closed (1001) as dead."""
    refusal_log_interval: float = attrs.field(default=60.0, validator=positive)
    """Seconds between two log lines about refused handshakes from the same peer address."""
    # -- messages -----------------------------------------------------------------------------------------
    max_message_size: int = attrs.field(default=1024 * 1024, validator=positive)
    """Largest client message, in characters for text (bytes for binary); larger: close 1009."""
    outbound_queue: int = attrs.field(default=256, validator=positive)
    """Messages queued for the client before senders wait."""
    slow_consumer_grace: float = attrs.field(default=5.0, validator=positive)
    """Seconds a reply or an execution event may wait for room in the outbound queue before the
    connection is closed with 1008."""
    max_pending_requests: int = attrs.field(default=64, validator=positive)
    """Requests waiting on a worker at once (``program/create``, ``lm/configure``, ...); past it:
    ``limit_exceeded``."""
    # -- executions and subscriptions ---------------------------------------------------------------------
    max_executions: int = attrs.field(default=64, validator=positive)
    """Executions in flight (``execution/submit`` + ``execution/run``); past it: ``limit_exceeded``."""
    max_execution_time: float = attrs.field(default=600.0, validator=positive)
    """Seconds one execution may run (queueing included), whatever ``timeout`` the client asks for."""
    remember_finished: int = attrs.field(default=1024, validator=positive)
    """Finished executions remembered per connection, so ``execution/cancel`` stays idempotent."""
    max_subscriptions: int = attrs.field(default=4, validator=positive)
    """Health subscriptions at once; past it: ``limit_exceeded``."""
    health_buffer: int = attrs.field(default=64, validator=positive)
    """Health events buffered per subscription before they are dropped (then ``lagged`` + snapshot)."""
    # -- jobs (job/submit: evaluate, compile) --------------------------------------------------------------
    max_jobs: int = attrs.field(default=4, validator=positive)
    """Jobs running at once on one connection; past it: ``limit_exceeded``."""
    max_job_examples: int = attrs.field(default=10_000, validator=positive)
    """Examples in one job (a devset; a trainset and a valset together); past it: ``limit_exceeded``."""
    max_job_concurrency: int = attrs.field(default=256, validator=positive)
    """Examples of one job in flight at once (a client asking for more gets this many)."""
    job_progress_interval: float = attrs.field(default=0.1, validator=positive)
    """Seconds between two ``progress`` events of one job (the latest progress is sent; the rest is
    coalesced)."""
    # -- sessions -----------------------------------------------------------------------------------------
    max_sessions_per_connection: int = attrs.field(default=16, validator=positive)
    """Sessions one connection has opened (``session/open``) and not ended, at once."""
    session_max_programs: int = attrs.field(default=256, validator=positive)
    """Programs one client session (opened, or a connection's private one) may hold."""
    session_max_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=positive)
    """Bytes of program specs (JSON: signature, instructions, state) one client session may hold."""
    # -- the LMs clients may use ---------------------------------------------------------------------------
    client_lm: ClientLM = attrs.field(default="off", validator=_mode)
    """``off``: clients choose among the operator's LMs by name (``lm/select``); ``allowlist``: clients may
    configure LMs under ``allow_lm_bases`` with their own key; ``any``: any public base (docs/security.md)."""
    allow_lm_bases: tuple[str, ...] = attrs.field(default=(), converter=_strings, validator=_bases)
    """``api_base`` prefixes clients may use (and which may point at non-public addresses)."""
    client_lm_max_retries: int = attrs.field(default=2, validator=non_negative)
    """Largest ``num_retries`` a client may set on an LM."""
    client_lm_max_timeout: float = attrs.field(default=120.0, validator=positive)
    """Largest ``timeout`` (s per LM request) a client may set on an LM."""
    client_lm_max_tokens: int = attrs.field(default=16_384, validator=positive)
    """Largest ``max_tokens`` a client may set on an LM."""

    def lm_policy(self) -> ClientLMPolicy:
        return ClientLMPolicy(
            mode=self.client_lm,
            allowed_bases=self.allow_lm_bases,
            max_retries=self.client_lm_max_retries,
            max_timeout=self.client_lm_max_timeout,
            max_tokens=self.client_lm_max_tokens,
        )
