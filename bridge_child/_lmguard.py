"""The worker's guards around DSPy's LM client: hermetic credentials, connect-time egress checks, and
retry waits that a cancel or the call's deadline ends.

DSPy 3.4 sends LM requests through its vendored lm15 client (``dspy.LM(..., engine="lm15")``): for
each LM, ``dspy.clients.execution._select_engine`` builds an ``LM15Engine`` (``AsyncLM15Engine`` for
async calls, one per event loop) from a ``RouterConfig``, whose router builds the provider adapter
(which finds the credential) and one shared HTTP transport. :func:`install` (called by
``bridge_child._programs.preload``, so the zygote template installs it once before forking) hooks four
seams of that path, and nothing else:

- ``execution._select_engine`` (the start of every LM call) marks, for the time one LM's engine is
  chosen, which :class:`LMGuard` that LM carries (``lm._dspex_guard``; none for ordinary LMs), and
  refuses to start an LM call for a worker call already cancelled (:class:`CallCancelled`);
- ``execution.LM15Engine`` / ``AsyncLM15Engine`` are replaced by subclasses that, for a guarded LM,
  build their ``RouterConfig`` through :meth:`LMGuard.router_config` and their router with a
  :class:`GuardedTransport` / :class:`GuardedAsyncTransport`;
- ``execution._delay`` (the wait between DSPy's retries) becomes :func:`_bounded_delay`.

What a guard does, per flag of the LM configuration (``bridge_child._lmrules``):

- ``hermetic``: the router gets ``env={}`` (no ``OPENAI_API_KEY`` or other environment credential,
  no environment endpoint), ``api_keys={provider: the configuration's key}`` (or the public stand-in
  ``NO_CREDENTIAL`` when it has none, so lm15 never falls back to a stored login), ``base_urls`` with
  the configuration's own base only, and no named cloud identity. Providers whose credential is a
  stored login (``oauth``) or the machine's cloud identity (``*-chain``, hosted doors) are refused when
  the LM is built (:func:`guarded_lm`). The transport then checks every request before it is sent:
  the stand-in is removed (so a keyless LM sends no credential at all), and a credential header other
  than the configuration's own key is refused (:class:`CredentialRefused`), whatever put it there.
- ``public_only``: the transport ignores proxy variables (through a proxy the worker cannot see where
  the proxy connects), and while it opens a connection an audit hook (``sys.addaudithook``, installed
  on first use) refuses any ``socket.connect`` of that request to a non-public address
  (``bridge_child.netaddr``): the address checked is the one connected to, after DNS, so a name that
  resolved to a public address when the host checked it and to ``127.0.0.1`` now is refused
  (:class:`EgressRefused`). The hook acts only inside that transport's requests (a context variable),
  so other LMs' requests in the same worker are untouched.

Retries: DSPy sleeps ``Retry-After`` (or its backoff) between attempts, uninterruptibly. With
:func:`current_call` marking the worker call a thread runs, the wait ends at once when the call is
cancelled (``CallContext.cancelled``) and never outlasts its deadline: a wait longer than the time
left, or than ``MAX_RETRY_WAIT_S``, ends the call with the LM's own error (e.g. ``LMRateLimitError``)
instead of sleeping; a cancelled call never sends another attempt, nor starts another LM call.

Importing this module imports dspy; ``bridge_child._programs`` imports it lazily.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import importlib
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from dspy.clients import execution
from dspy.clients.backend_selection import select_backend
from dspy.clients.engines.lm15_engine import AsyncLM15Engine, LM15Engine

from bridge_child import _inflight, _leases, wire
from bridge_child._lmrules import NO_CREDENTIAL
from bridge_child.netaddr import address_class

# The vendored lm15 modules are imported by name: lm15 ships py.typed, and a typed import of it would
# make mypy read all of dspy (which is untyped) through it.
_registry = importlib.import_module("dspy._vendor.lm15.registry")
_router = importlib.import_module("dspy._vendor.lm15.router")
_transports = importlib.import_module("dspy._vendor.lm15.transports")
LMRouter: Any = _router.LMRouter
AsyncLMRouter: Any = _router.AsyncLMRouter
StdlibTransport: Any = _transports.StdlibTransport
StdlibAsyncTransport: Any = _transports.StdlibAsyncTransport
TransportRequest: Any = _transports.TransportRequest

if TYPE_CHECKING:
    from bridge_child._context import CallContext

MAX_RETRY_WAIT_S: Final = 60.0
"""Longest wait between two attempts of one LM call (DSPy's own backoff tops out at 60 s too): a
``Retry-After`` longer than this ends the call with the LM's error instead of waiting."""
KEY_POLICIES: Final = frozenset({"key", "oauth-unless-explicit"})
"""lm15 credential policies under which an explicit key is the only credential used (the second
reads a stored login only when no key is given, and a hermetic LM always gives one)."""
MAX_LM_CONNECTIONS: Final = 8192
"""Connections one LM's client may hold open at once in a worker, a count (lm15's default is 100, too
few for the asynchronous lane's thousands of requests in flight)."""
HOST_PAUSED_ERRORS: Final = frozenset({"LMRateLimitError", "LMServerError"})
"""DSPy's errors for a ``429`` and a ``5xx``: after one, the host pauses the LM for every worker (with
the answer's ``Retry-After``, or its backoff), so a leasing worker retries without a wait of its own."""
CREDENTIAL_HEADERS: Final = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key"})
"""Request headers that carry a provider credential (lm15's ``auth_header`` renderings)."""


class EgressRefused(Exception):
    """A ``public_only`` LM tried to connect to a non-public address (not an ``OSError``: nothing
    retries it, and the socket layer does not try the next address)."""


class CredentialRefused(Exception):
    """A hermetic LM's request carried a credential its configuration did not give: not sent."""


class CallCancelled(Exception):
    """An LM call was about to start for a worker call that is already cancelled (a program that goes
    on after its cancel, or DSPy's JSON fallback after a parse error): refused, nothing is sent."""


@dataclasses.dataclass(frozen=True)
class LMGuard:
    """The guard of one LM: its provider (as lm15 routes it) and its flags."""

    provider: str
    hermetic: bool
    public_only: bool
    api_key: str | None = dataclasses.field(repr=False)
    api_base: str | None
    lease_key: str | None = None
    """The LM's budget key (``wire.lm_key``) when the worker leases before each request."""
    leases: _leases.Leases | None = dataclasses.field(default=None, repr=False, compare=False)
    """The worker's leases (``--lease-lms``), or None."""

    def lease(self, request: Any) -> _leases.Lease | None:
        """Wait for the host's lease for ``request`` (None when this LM does not lease).

        Raises:
            LeaseAbandoned: the call was cancelled or reached its deadline while waiting.
            LeaseRefused: the host said no.
        """
        if self.leases is None or self.lease_key is None:
            return None
        call = _CALL.get()
        try:
            lease = self.leases.acquire(
                None if call is None else call.ctx, self.lease_key, _leases.estimate_tokens(request.body)
            )
        except (_leases.LeaseAbandoned, _leases.LeaseRefused) as exc:
            if call is not None:
                call.refusal = exc
            raise
        if call is not None:
            call.leased = True
        return lease

    async def lease_async(self, request: Any) -> _leases.Lease | None:
        """:meth:`lease` on the asynchronous lane (waits on the event loop)."""
        if self.leases is None or self.lease_key is None:
            return None
        call = _CALL.get()
        try:
            lease = await self.leases.acquire_async(
                None if call is None else call.ctx, self.lease_key, _leases.estimate_tokens(request.body)
            )
        except (_leases.LeaseAbandoned, _leases.LeaseRefused) as exc:
            if call is not None:
                call.refusal = exc
            raise
        if call is not None:
            call.leased = True
        return lease

    def router_config(self, config: Any) -> Any:
        """The ``RouterConfig`` this LM's engine is built with (DSPy's, hardened for a hermetic LM, and
        with room for ``MAX_LM_CONNECTIONS`` requests at once)."""
        if config.max_connections is None and config.transport is None:
            config = dataclasses.replace(config, max_connections=MAX_LM_CONNECTIONS)
        if not self.hermetic:
            return config
        return dataclasses.replace(
            config,
            env={},
            api_keys={self.provider: self.api_key or NO_CREDENTIAL},
            base_urls={self.provider: self.api_base} if self.api_base else None,
            credentials=None,
            settings=None,
        )

    def outgoing(self, request: Any) -> Any:
        """The request as it may be sent: the stand-in credential removed; for a hermetic LM, refused
        if a credential header holds anything but the configuration's own key."""
        if not self.hermetic:
            return request
        allowed = {self.api_key, f"Bearer {self.api_key}"} if self.api_key else set()
        headers = []
        for name, value in request.headers:
            if NO_CREDENTIAL in value:
                continue
            if name.lower() in CREDENTIAL_HEADERS and value not in allowed:
                raise _refused(
                    CredentialRefused(
                        f"refusing to send a {name!r} credential that this hermetic {self.provider} LM "
                        "configuration did not give"
                    )
                )
            headers.append((name, value))
        url = request.url
        if NO_CREDENTIAL in url:  # a door that sends its key as a query parameter
            parts = urllib.parse.urlsplit(url)
            query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if NO_CREDENTIAL not in v]
            url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        return dataclasses.replace(request, headers=headers, url=url)


# -- the transports ---------------------------------------------------------------------------------

_CONNECTING: contextvars.ContextVar[LMGuard | None] = contextvars.ContextVar("dspex_connecting", default=None)
_SENDING: contextvars.ContextVar[_Sending | None] = contextvars.ContextVar("dspex_sending", default=None)
"""The request this context is sending (its socket and send time are recorded on it)."""
"""The guard of the request this context is opening a connection for (read by the audit hook)."""


class _Guarded:
    """What both guarded transports share: the guard they carry, ``trust_env`` off by default for a
    ``public_only`` LM, and a ``copy`` that keeps the guard (lm15 copies transports)."""

    _guard: LMGuard

    def __init__(self, guard: LMGuard, **kwargs: Any) -> None:
        kwargs.setdefault("trust_env", not guard.public_only)
        super().__init__(**kwargs)
        self._guard = guard

    def copy(self) -> Any:
        transport: Any = self  # the lm15 transport this is mixed into holds these
        return type(self)(
            self._guard,
            connect_timeout=transport._connect_timeout,
            read_timeout=transport._read_timeout,
            write_timeout=transport._write_timeout,
            pool_timeout=transport._pool_timeout,
            max_connections=transport._max_connections,
            verify=transport._verify,
            ca_bundle=transport._ca_bundle,
            user_agent=transport._user_agent,
            proxy=transport._proxy,
            trust_env=transport._trust_env,
        )


class GuardedTransport(_Guarded, StdlibTransport):
    """lm15's synchronous transport, checking each request before it is sent and, for a ``public_only``
    LM, each address it connects to."""

    def stream(self, request: Any) -> Any:
        request = self._guard.outgoing(request)
        lease = self._guard.lease(request)
        call = _CALL.get()
        sending = _Sending(lease, None if call is None else call.ctx)
        token = _CONNECTING.set(self._guard if self._guard.public_only else None)
        marker = _SENDING.set(sending)
        try:
            response = super().stream(request)
        except BaseException:
            sending.done()  # no answer (connect error, timeout, or closed by a cancel)
            raise
        finally:
            _SENDING.reset(marker)
            _CONNECTING.reset(token)
        return _leases.attach(sending.lease, response, on_release=sending.forget)

    def _send_request(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        sending = _SENDING.get()
        if sending is not None:
            sending.track(conn.sock)  # a cancel of the call closes this connection
        super()._send_request(conn, *args, **kwargs)
        if sending is not None and sending.lease is not None:
            sending.lease.sent_at = time.monotonic()  # the host counts it against the LM's rate from now


class _Sending:
    """One request being sent by a guarded transport: its lease (or None), and its socket, registered
    with ``bridge_child._inflight`` under its call until its answer is released."""

    __slots__ = ("ctx", "lease", "sock")

    def __init__(self, lease: _leases.Lease | None, ctx: CallContext | None) -> None:
        self.lease = lease
        self.ctx = ctx
        self.sock: Any = None

    def track(self, sock: Any) -> None:
        self.forget()  # a stale pooled connection is replaced by a fresh one
        self.sock = sock
        if self.ctx is not None and sock is not None:
            _inflight.register(self.ctx, sock)

    def forget(self) -> None:
        if self.sock is not None and self.ctx is not None:
            _inflight.unregister(self.ctx, self.sock)
        self.sock = None

    def done(self) -> None:
        self.forget()
        if self.lease is not None:
            self.lease.release()


class GuardedAsyncTransport(_Guarded, StdlibAsyncTransport):
    """lm15's asyncio transport, with the same checks as :class:`GuardedTransport`."""

    async def _do_stream(self, request: Any) -> Any:
        request = self._guard.outgoing(request)
        lease = await self._guard.lease_async(request)
        call = _CALL.get()
        sending = _Sending(lease, None if call is None else call.ctx)
        token = _CONNECTING.set(self._guard if self._guard.public_only else None)
        marker = _SENDING.set(sending)
        try:
            response = await super()._do_stream(request)
        except BaseException:
            sending.done()
            raise
        finally:
            _SENDING.reset(marker)
            _CONNECTING.reset(token)
        return _leases.attach_async(lease, response, on_release=sending.forget)

    async def _send_request(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        sending = _SENDING.get()
        if sending is not None:  # a cancel of the call closes this connection at once
            sending.track(conn.writer.get_extra_info("socket"))
        await super()._send_request(conn, *args, **kwargs)
        if sending is not None and sending.lease is not None:
            sending.lease.sent_at = time.monotonic()


def _connect_refusal(address: Any) -> str | None:
    """Why a ``public_only`` request may not connect to ``address`` (a ``socket.connect`` argument),
    or None if it may (a public IP address)."""
    if not (isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], str)):
        return "it is not an internet address"
    try:
        refused = address_class(address[0])
    except ValueError:
        return "it is a name, not a resolved address"
    return None if refused is None else f"it is a {refused} address"


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "socket.connect":
        return
    guard = _CONNECTING.get()
    if guard is None:
        return
    refusal = _connect_refusal(args[1])
    if refusal is not None:
        where = args[1][0] if isinstance(args[1], tuple) and args[1] else args[1]
        raise _refused(
            EgressRefused(
                f"refused to connect the {guard.provider} LM to {where}: {refusal}, and this LM may "
                "reach public addresses only (public_only)"
            )
        )


_audit_lock = threading.Lock()
_audit_installed = False


def _install_audit_hook() -> None:
    """Install :func:`_audit` once per process (hooks cannot be removed; outside a guarded request
    it returns at once)."""
    global _audit_installed
    with _audit_lock:
        if not _audit_installed:
            sys.addaudithook(_audit)
            _audit_installed = True


# -- the engines --------------------------------------------------------------------------------------

_SELECTING: contextvars.ContextVar[LMGuard | None] = contextvars.ContextVar("dspex_selecting", default=None)
"""The guard of the LM whose engine is being chosen (set around ``execution._select_engine``)."""


class _GuardedRouting:
    """What both routers share: the guard, and one shared transport of the router's kind, guarded."""

    _transport: Any
    _transport_class: type[_Guarded]

    def __init__(self, config: Any, guard: LMGuard) -> None:
        super().__init__(config)  # type: ignore[call-arg]  # the lm15 router this is mixed into
        self._guard = guard

    def _shared_transport(self) -> Any:
        router: Any = self  # the lm15 router holds the lock and the config
        with router._lock:
            if self._transport is None:
                self._transport = self._transport_class(self._guard, **router.config.transport_kwargs())
            return self._transport


class _GuardedRouter(_GuardedRouting, LMRouter):
    _transport_class = GuardedTransport


class _GuardedAsyncRouter(_GuardedRouting, AsyncLMRouter):
    _transport_class = GuardedAsyncTransport


class _Engine(LM15Engine):
    def __init__(self, config: Any = None, *, model_type: str = "chat") -> None:
        guard = _SELECTING.get()
        super().__init__(config if guard is None else guard.router_config(config), model_type=model_type)
        if guard is not None:
            self.router = _GuardedRouter(self.config, guard)


class _AsyncEngine(AsyncLM15Engine):
    def __init__(self, config: Any = None, *, model_type: str = "chat") -> None:
        guard = _SELECTING.get()
        super().__init__(config if guard is None else guard.router_config(config), model_type=model_type)
        if guard is not None:
            self.router = _GuardedAsyncRouter(self.config, guard)


_original_select_engine = execution._select_engine
_original_delay = execution._delay


def _select_engine(lm: Any, call: Any, asynchronous: bool) -> Any:
    """``execution._select_engine``, at the start of every LM call: refuses to start one for a cancelled
    worker call, and tells the engine classes which guard this LM carries."""
    current = _CALL.get()
    if current is not None and current.ctx.cancelled.is_set():
        raise CallCancelled("the worker call was cancelled: no further LM request is sent")
    token = _SELECTING.set(getattr(lm, "_dspex_guard", None))
    try:
        return _original_select_engine(lm, call, asynchronous)
    finally:
        _SELECTING.reset(token)


# -- retry waits -------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CallGuard:
    """What the guards know of the worker call a context runs (made by :func:`current_call`)."""

    ctx: CallContext
    refusal: EgressRefused | CredentialRefused | _leases.LeaseAbandoned | _leases.LeaseRefused | None = None
    """The last guard refusal during the call: the reason its LM failed. (DSPy reports it as an
    ``LMUnexpectedError``, and a streamed call drops the exception's cause.)"""
    leased: bool = False
    """One of its LM requests waited for a host lease: the host's pause after a ``429``/``5xx`` is
    the wait before DSPy's retry (DSPy's own backoff is skipped)."""


_CALL: contextvars.ContextVar[CallGuard | None] = contextvars.ContextVar("dspex_call", default=None)


@contextlib.contextmanager
def current_call(ctx: CallContext) -> Iterator[CallGuard]:
    """Mark ``ctx`` as the worker call this context runs: DSPy's retry waits inside end when it is
    cancelled and never outlast its deadline (:func:`_bounded_delay`), and a guard refusing one of its
    requests is recorded on the yielded :class:`CallGuard`."""
    install()
    guard = CallGuard(ctx)
    token = _CALL.set(guard)
    try:
        yield guard
    finally:
        _CALL.reset(token)


def _refused(exc: EgressRefused | CredentialRefused) -> EgressRefused | CredentialRefused:
    call = _CALL.get()
    if call is not None:
        call.refusal = exc
    return exc


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _bounded_delay(exc: BaseException, attempt: int) -> float:
    """``execution._delay``: wait here, interruptibly, and return 0 (DSPy then sleeps 0 s).

    Raises ``exc`` (the LM's error: the call ends with it) instead of waiting when the wait would
    outlast the call's deadline or ``MAX_RETRY_WAIT_S``, and as soon as the call is cancelled. Outside
    a worker call (no :func:`current_call`), returns DSPy's delay capped at ``MAX_RETRY_WAIT_S``.
    """
    delay = float(_original_delay(exc, attempt))
    call = _CALL.get()
    ctx = None if call is None else call.ctx
    remaining = None if ctx is None else ctx.remaining()
    limit = MAX_RETRY_WAIT_S if remaining is None else min(MAX_RETRY_WAIT_S, remaining)
    if delay > limit:
        why = "the most dspex waits" if limit == MAX_RETRY_WAIT_S else "the time left to the call's deadline"
        exc.add_note(f"dspex: not retried: the wait ({delay:g} s) is longer than {why} ({limit:g} s)")
        raise exc
    if ctx is None:
        return delay
    if call is not None and call.leased and type(exc).__name__ in HOST_PAUSED_ERRORS:
        if ctx.cancelled.is_set():
            exc.add_note("dspex: not retried: the call was cancelled")
            raise exc
        return 0.0  # the retry's lease waits out the host's pause of this LM (every worker's)
    if _in_event_loop():  # the asynchronous lane: DSPy's asyncio.sleep is ended by the task's cancel
        return delay
    if ctx.cancelled.wait(delay):
        exc.add_note("dspex: not retried: the call was cancelled")
        raise exc
    return 0.0


# -- building guarded LMs ------------------------------------------------------------------------------

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Hook the seams described in the module docstring (idempotent and cheap once done). Called by
    ``preload`` (before the zygote forks), and again by :func:`guarded_lm` and :func:`current_call`, so
    the hooks are in place even when something imported dspy before ``preload`` ran.

    Raises:
        RuntimeError: this DSPy does not have the seams (another version than the one tested, 3.4.1):
            hermetic and public_only LMs then cannot be built, and executions fail, rather than run
            unguarded.
    """
    global _installed
    if _installed:
        return
    with _install_lock:
        if not _installed:
            _install()


def _install() -> None:
    global _installed
    missing = [
        name
        for name in ("_select_engine", "_delay", "LM15Engine", "AsyncLM15Engine")
        if not hasattr(execution, name)
    ]
    if missing or execution.LM15Engine is not LM15Engine or execution.AsyncLM15Engine is not AsyncLM15Engine:
        raise RuntimeError(f"dspy.clients.execution lacks the seams dspex hooks ({', '.join(missing)})")
    execution._select_engine = _select_engine
    execution.LM15Engine = _Engine
    execution.AsyncLM15Engine = _AsyncEngine
    execution._delay = _bounded_delay
    _installed = True


def _route(lm: Any) -> tuple[str, str, bool]:
    """(provider, credential policy, hosted) of the door lm15 routes ``lm`` to (offline: no I/O)."""
    from dspy.lm15 import _definitions

    resolution = select_backend(lm).resolution
    provider = resolution.provider
    declared = {d.id: d for d in _definitions(getattr(lm, "_providers", ()))}
    definition = declared.get(provider) or _registry.lookup(provider)
    if definition is None:
        return provider, _router._credential_policy(provider), False
    return provider, definition.access.credential_policy, bool(definition.hosted)


def guarded_lm(dspy: Any, config: dict[str, Any], leases: _leases.Leases | None = None) -> Any:
    """The ``dspy.LM`` of a configuration with ``hermetic`` and/or ``public_only`` set, or of any
    network LM of a worker that leases (``leases``: it asks the host before each request).

    Raises:
        ValueError: a hermetic configuration whose provider's credential would be a stored login or
            the machine's cloud identity (the message names the provider).
        RuntimeError: the hooks are not installed (this DSPy lacks the seams).
    """
    install()
    hermetic, public_only = bool(config.get("hermetic")), bool(config.get("public_only"))
    settings = {k: v for k, v in config.items() if k not in ("model", "hermetic", "public_only")}
    from bridge_child import _lmcache

    lm = dspy.LM(config["model"], engine="lm15", cache=_lmcache.enabled(), **settings)
    provider, policy, hosted = _route(lm)
    if hermetic and (hosted or policy not in KEY_POLICIES):
        kind = "a cloud door" if hosted else f"credential policy {policy!r}"
        raise ValueError(
            f"a hermetic (client-chosen) LM cannot use provider {provider!r} ({kind}): its credential would "
            "be this machine's identity or a stored login, not the configuration's own api_key"
        )
    if public_only:
        _install_audit_hook()
    lease_key = None if leases is None else wire.lm_key(config["model"], config.get("api_base"))
    lm._dspex_guard = LMGuard(
        provider,
        hermetic,
        public_only,
        config.get("api_key"),
        config.get("api_base"),
        lease_key=lease_key,
        leases=leases,
    )
    return lm
