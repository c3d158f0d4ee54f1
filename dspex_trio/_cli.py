"""The ``dspex-trio`` command line (also ``python -m dspex_trio``).

Commands: ``serve`` (a pool behind the websocket endpoint), ``run`` (one program, on a pool of its own or
on a running server with ``--url``), ``status`` (a server's live health), ``demo``, and ``fake-lm`` (a
test LM server).

One error path for every command (:func:`main`): an expected failure (a port in use, a bad setting, a
missing key, a server out of reach) is one line on stderr naming the cause and the fix, exit 1; Ctrl-C
is exit 130; ``-v`` adds the full traceback. An unexpected error is one line too, asking for ``-v``.
The settings of ``serve`` are in ``_cli_settings.py``, the websocket client side (``status``, ``run
--url``) in ``_cli_client.py``, ``run`` in ``_cli_run.py``.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import json
import logging
import os
import platform
import signal
import socket
import ssl
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Final

import trio

import dspex_trio
from dspex_trio._cli_client import client_token, status
from dspex_trio._cli_jobs import add_job_commands
from dspex_trio._cli_monitoring import Monitoring, add_monitoring_arguments, monitoring_from, serve_tracing
from dspex_trio._cli_ray import add_ray_placement_arguments, open_pool_launcher
from dspex_trio._cli_run import RunRequest, parse_inputs, run_local, run_remote
from dspex_trio._cli_settings import (
    DRAIN_GRACE_S,
    KEY_VARIABLES,
    SETTING_NAMES,
    CliError,
    Secrets,
    ServeSettings,
    SettingsError,
    missing_key_warnings,
    resolve_secrets,
    resolve_settings,
    server_ssl_context,
)
from dspex_trio._handshake import SUBPROTOCOL, is_loopback
from dspex_trio._lm_budgets import parse_lm_budget
from dspex_trio._lm_cache import parse_lm_cache
from dspex_trio._log_context import fields as log_fields

__all__ = ["CliError", "ServeSettings", "SettingsError", "main", "resolve_secrets", "resolve_settings"]

logger = logging.getLogger("dspex_trio.cli")

SHUTDOWN_TIMEOUT_S: Final = 10.0
"""After the drain: bound on ending the remaining executions and closing every connection, in s."""
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
"""argparse's own exit status for a command line it cannot parse."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C (128 + SIGINT), the shell's convention."""
_GLOBAL_OPTIONS_WITH_VALUE: Final = frozenset({"--log-format"})


def _version() -> str:
    def version_of(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    ours = getattr(dspex_trio, "__version__", None) or version_of("dspex-trio")
    return (
        f"dspex-trio {ours} (Python {platform.python_version()}, trio {version_of('trio')}, "
        f"dspy {version_of('dspy')})"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspex-trio",
        description="Serve and run DSPy programs from a supervised pool of worker processes.",
        epilog="Errors are one line; -v shows the traceback. Settings and variables: docs/configuration.md",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log at INFO (-vv: DEBUG, except trio-websocket's frames; -vvv: those too)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="log lines as text (the default) or JSON objects (serve: also DSPEX_LOG_FORMAT, log_format)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="start a pool, run calls through it, print its statistics")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--calls", type=int, default=2000, help="concurrent no-op calls to run")
    demo.add_argument("--launcher", choices=["auto", "zygote", "subprocess"], default="auto")
    serve = commands.add_parser(
        "serve",
        help="serve a pool over websockets (JSON-RPC 2.0, subprotocol dspex.v1)",
        description="Serve a pool over websockets. Settings: defaults < --config file < DSPEX_* environment "
        f"< flags. The key of --lm: --lm-api-key-file, else {' or '.join(KEY_VARIABLES)}. SIGTERM or "
        "Ctrl-C drains (--drain-grace), a second one stops at once.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML file with any of: " + ", ".join(SETTING_NAMES))
    serve.add_argument(
        "--host", default=None, help="address to bind (default 127.0.0.1; others need a token)"
    )
    serve.add_argument("--port", type=int, default=None, help="port (default 8765; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")
    serve.add_argument(
        "--lm",
        default=None,
        help="'offline' (default: the embedded LM), provider/model, or the NAME of an [lms.NAME] table of "
        "the config file (with its fallbacks)",
    )
    serve.add_argument("--lm-base-url", default=None, help="base URL of an OpenAI-compatible endpoint")
    serve.add_argument(
        "--token",
        default=None,
        help="bearer token clients must send (needed off loopback); 'auto' makes one and prints it. A value "
        "given here is visible in the process list: prefer --token-file or DSPEX_TOKEN",
    )
    serve.add_argument("--token-file", default=None, metavar="PATH", help="read the client token from PATH")
    serve.add_argument(
        "--admin-token-file",
        default=None,
        metavar="PATH",
        help="read the admin token from PATH: connections with it may also change the default LM",
    )
    serve.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="a browser origin (scheme://host[:port]) allowed besides loopback pages (repeatable)",
    )
    serve.add_argument(
        "--client-lm",
        choices=["off", "allowlist", "any"],
        default=None,
        help="what LMs clients may configure: off (default: only the server's LMs, by name), allowlist "
        "(bases given with --allow-lm-base, with their own key), any (any public base)",
    )
    serve.add_argument(
        "--allow-lm-base",
        dest="allow_lm_bases",
        action="append",
        default=None,
        metavar="URL",
        help="an LM base URL prefix clients may use (repeatable; may be a private address)",
    )
    serve.add_argument(
        "--worker-env",
        action="append",
        default=None,
        metavar="NAME",
        help="pass this environment variable to the workers (repeatable; by default they get an allow-list)",
    )
    serve.add_argument(
        "--async-capacity",
        type=int,
        default=None,
        metavar="N",
        help="executions with a network LM each worker runs on its event loop, no thread each (default 0)",
    )
    serve.add_argument(
        "--lm-budget",
        dest="lm_budgets",
        action="append",
        default=None,
        metavar="SPEC",
        help="a pool-wide LM budget: 'MODEL[@BASE] [concurrent=N] [rpm=N] [tpm=N] [window=SECONDS]' "
        "(repeatable; docs/lm.md)",
    )
    serve.add_argument(
        "--lm-cache",
        default=None,
        metavar="SPEC",
        help="cache LM answers in the workers: 'on' or '[entries=N] [dir=PATH] [disk_mb=N] "
        "[mode=read_write|read_only|off]' (docs/lm.md)",
    )
    serve.add_argument(
        "--programs",
        action="append",
        default=None,
        metavar="MODULE",
        help="a program module to serve (repeatable; an importable module exposing PROGRAMS, TOOLS, METRICS)",
    )
    serve.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run the workers on this Ray cluster: auto, HOST:PORT or ray://HOST:PORT (extra dspex-trio[ray])",
    )
    serve.add_argument(
        "--ray-listen",
        default=None,
        metavar="HOST:PORT",
        help="where the Ray nodes reach this server's workers listener (default 127.0.0.1:0)",
    )
    add_ray_placement_arguments(serve)
    serve.add_argument(
        "--lm-api-key-file",
        default=None,
        metavar="PATH",
        help=f"read the key of --lm from PATH (default: {', then '.join(KEY_VARIABLES)})",
    )
    serve.add_argument(
        "--diagnostics", action=argparse.BooleanOptionalAction, default=None, help="enable diagnostic methods"
    )
    serve.add_argument("--drain-grace", type=float, default=None, help=f"seconds (default {DRAIN_GRACE_S:g})")
    serve.add_argument(
        "--certfile",
        default=None,
        metavar="PATH",
        help="serve wss:// (TLS): PEM file of the server's certificate chain (and its key, unless --keyfile)",
    )
    serve.add_argument(
        "--keyfile", default=None, metavar="PATH", help="PEM file of the certificate's private key"
    )
    add_monitoring_arguments(serve)

    run = commands.add_parser(
        "run",
        help="create and run one program from the shell, streaming to the terminal",
        description="Run one program. Without --url it starts a pool of its own (one worker, a few "
        "seconds; the embedded offline LM answers with deterministic placeholder text unless --lm names "
        "another); with --url it runs on that server. "
        'Example: dspex-trio run "question -> answer" --input question="What is DSPy?"',
    )
    run.add_argument("signature", help='a DSPy signature, e.g. "question -> answer, confidence: float"')
    run.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input, as text (repeatable)",
    )
    run.add_argument(
        "--inputs-json", metavar="JSON", help="inputs as a JSON object, for typed ones: '{\"n\": 3}'"
    )
    run.add_argument("--module", default="predict", choices=["predict", "chain_of_thought"])
    run.add_argument("--instructions", default=None)
    run.add_argument(
        "--lm",
        default=None,
        help="'offline' (default) or provider/model (DSPEX_LM); with --url, the name of one of the "
        "server's LMs, or provider/model if the server lets clients configure LMs",
    )
    run.add_argument("--lm-base-url", default=None, help="OpenAI-compatible base URL (DSPEX_LM_BASE_URL)")
    run.add_argument(
        "--lm-api-key-file",
        default=None,
        metavar="PATH",
        help=f"read the LM's key from PATH (default without --url: {', then '.join(KEY_VARIABLES)}; "
        "with --url only this file's key is sent)",
    )
    run.add_argument("--timeout", type=float, default=None, help="seconds")
    run.add_argument("--json", action="store_true", help="print the outputs as one JSON object at the end")
    run.add_argument(
        "--url", default=None, help="run on the server at this ws:// URL instead of a pool of its own"
    )
    run.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="with --url: the server's token (default DSPEX_TOKEN)",
    )

    status_ = commands.add_parser(
        "status", help="connect to a server and show its live health (Ctrl-C stops)"
    )
    status_.add_argument("--url", default=None, help="default ws://DSPEX_HOST:DSPEX_PORT (127.0.0.1:8765)")
    status_.add_argument(
        "--token", default=None, help="bearer token (visible in the process list: prefer --token-file)"
    )
    status_.add_argument(
        "--token-file", default=None, metavar="PATH", help="read the token from PATH (default DSPEX_TOKEN)"
    )
    status_.add_argument("--once", action="store_true", help="print the snapshot and exit")
    status_.add_argument("--json", action="store_true", help="print raw JSON messages")
    status_.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to connect and get the snapshot"
    )

    commands.add_parser(
        "fake-lm",
        help="serve a small OpenAI-compatible LM for tests (dspex-trio fake-lm --help)",
        add_help=False,
    )
    _COMMANDS.update(add_job_commands(commands))
    return parser


async def _demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    async with dspex_trio.open_pool(workers=args.workers, diagnostics=True, launcher=args.launcher) as pool:
        ready = time.perf_counter() - started
        stats = pool.statistics()
        print(f"pool of {stats.size} workers ready in {ready * 1000:.0f} ms (launcher: {stats.launcher})")
        for worker in stats.workers:
            print(f"  {worker.worker_id}: pid {worker.pid}, {worker.state}, capacity {worker.capacity}")

        results: dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await pool.call("echo", {"value": i}, wait=True)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(args.calls):
                nursery.start_soon(one, i)
        elapsed = time.perf_counter() - t0
        assert all(results[i] == i for i in range(args.calls)), "a reply reached the wrong caller"
        print(
            f"{args.calls} concurrent echo calls in {elapsed * 1000:.0f} ms ({args.calls / elapsed:,.0f} calls/s)"
        )
        echo = pool.statistics().latency["echo"]
        print(f"  latency p50 {echo.p50 * 1e3:.2f} ms, p99 {echo.p99 * 1e3:.2f} ms")
    print("pool closed: every worker stopped")
    return 0


# -- serve -------------------------------------------------------------------------------------------------


def _bind_failure(host: str, port: int, exc: OSError, flag: str = "--port") -> str:
    """The one line for a listening socket (of ``flag``'s port) that could not be opened."""
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot listen on {host!r}: {exc.strerror or exc}: give an address of this machine with --host"
        )
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (another dspex-trio serve?): stop that server, "
            f"or choose another port with {flag} (0 picks a free one)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: it is not an address of this machine: choose one with --host"
    if exc.errno == errno.EACCES:
        return (
            f"not allowed to listen on port {port} (below 1024 needs privileges): choose another with {flag}"
        )
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


async def _listen(host: str, port: int, *, flag: str = "--port") -> list[trio.SocketListener]:
    """Bind the server's socket (or ``--http-port``'s) first: a port in use fails here, before any
    worker starts."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise CliError(_bind_failure(host, port, exc, flag)) from exc


def _signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


async def _serve(
    settings: ServeSettings,
    keys: Secrets,
    tls: ssl.SSLContext | None = None,
    monitoring: Monitoring | None = None,
) -> int:
    """Start the workers' launcher (on this machine the zygote template, which imports dspy and the program
    modules in the background meanwhile), then serve with the pool forking from it (``_serve_on``)."""
    async with open_pool_launcher(settings) as where:
        return await _serve_on(where, settings, keys, tls, monitoring)


async def _serve_on(
    where: dict[str, Any],
    settings: ServeSettings,
    keys: Secrets,
    tls: ssl.SSLContext | None,
    monitoring: Monitoring | None,
) -> int:
    """Bind, start the pool, serve until a signal, drain, shut down. Signals by phase: while starting,
    stop at once; while serving, drain (up to ``drain_grace``); while draining, skip the rest of the grace
    (running executions get their terminal ``cancelled`` event); while shutting down, stop at once."""
    monitoring = monitoring or Monitoring()
    if keys.token is None and not is_loopback(settings.host):
        raise SettingsError(
            f"refusing to serve on {settings.host!r} without a token: set --token-file, DSPEX_TOKEN or "
            "--token auto, or bind 127.0.0.1"
        )
    options = dspex_trio.WebsocketOptions(
        allowed_origins=settings.allowed_origins,
        client_lm=settings.client_lm,  # type: ignore[arg-type]  # checked by resolve_settings
        allow_lm_bases=settings.allow_lm_bases,
    )
    grace = settings.drain_grace
    phase = "starting"  # -> serving -> draining -> shutting down
    interrupted = False
    drain_requested = trio.Event()
    draining = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        listeners = await _listen(settings.host, settings.port)
        http_listeners = None
        if monitoring.http_port is not None:
            try:
                http_listeners = await _listen(settings.host, monitoring.http_port, flag="--http-port")
            except BaseException:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await listener.aclose()
                raise
        logger.info(
            "bound %s:%d; starting %d worker(s)",
            settings.host,
            listeners[0].socket.getsockname()[1],
            settings.workers,
        )
        try:
            async with trio.open_nursery() as everything:

                async def on_signals() -> None:
                    nonlocal interrupted, phase
                    async for signum in signals:
                        name = _signal_name(signum)
                        if phase == "serving":
                            again = "Ctrl-C again" if signum == signal.SIGINT else "a second signal"
                            _say(f"{name}: draining (up to {grace:g} s; {again} stops at once)")
                            phase = "draining"  # now: a signal right after this one skips the grace
                            drain_requested.set()
                        elif phase == "draining":
                            interrupted = True
                            _say(f"{name} again: cancelling the running executions")
                            draining.cancel()
                        else:
                            interrupted = interrupted or phase == "shutting down" or signum == signal.SIGINT
                            _say(f"{name}: stopping at once")
                            everything.cancel_scope.cancel()
                            return

                everything.start_soon(on_signals)
                async with dspex_trio.open_pool(
                    workers=settings.workers,
                    diagnostics=settings.diagnostics,
                    programs=settings.programs,
                    lm_budgets=[parse_lm_budget(text) for text in settings.lm_budgets] or None,
                    async_capacity=settings.async_capacity,
                    lm_cache=None if settings.lm_cache is None else parse_lm_cache(settings.lm_cache),
                    **where,
                ) as pool:
                    await _configure_default_lm(pool, settings, keys.lm_key, keys.lms)
                    async with trio.open_nursery() as nursery:
                        server = await nursery.start(
                            partial(
                                dspex_trio.serve_websocket,
                                pool,
                                settings.host,
                                settings.port,
                                token=keys.token,
                                admin_token=keys.admin_token,
                                lms=keys.lms,
                                options=options,
                                listeners=listeners,
                                ssl_context=tls,
                                http_routes=monitoring.http_routes,
                                metrics_token=monitoring.metrics_token,
                            )
                        )
                        phase = "serving"
                        print(f"dspex-trio serving {server.url} (subprotocol {SUBPROTOCOL})", flush=True)
                        if keys.generated:
                            print(f"token (send 'Authorization: Bearer <token>'): {keys.token}", flush=True)
                        if monitoring.http_port is not None:
                            http = await nursery.start(
                                partial(
                                    dspex_trio.serve_http,
                                    pool,
                                    settings.host,
                                    monitoring.http_port,
                                    listeners=http_listeners,
                                    token=keys.token,
                                    admin_token=keys.admin_token,
                                    metrics_token=monitoring.metrics_token,
                                    allowed_origins=settings.allowed_origins,
                                    websocket_url=server.url,
                                )
                            )
                            print(
                                f"dspex-trio monitoring {http.url} (/metrics /healthz /readyz /)", flush=True
                            )
                        await drain_requested.wait()
                        with draining, trio.move_on_after(grace):
                            await server.drain()
                        # what still runs ends with its terminal `cancelled` event; then every connection closes
                        phase = "shutting down"
                        with trio.move_on_after(SHUTDOWN_TIMEOUT_S):
                            await server.shutdown()
                        nursery.cancel_scope.cancel()
                everything.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in [*listeners, *(http_listeners or ())]:
                    await listener.aclose()
    _say("dspex-trio stopped" + (" (interrupted)" if interrupted else ""))
    return EXIT_INTERRUPTED if interrupted else 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _configure_default_lm(
    pool: dspex_trio.Pool,
    settings: ServeSettings,
    key: str | None = None,
    lms: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    lms = lms or {}
    if settings.lm in (None, "offline"):
        if settings.lm_base_url is not None:
            raise SettingsError("--lm-base-url needs --lm provider/model")
        return
    try:
        if settings.lm in lms and "/" not in settings.lm:  # --lm NAME: a [lms.NAME] table (a chain too)
            if settings.lm_base_url is not None:
                raise SettingsError(
                    f"--lm-base-url is for --lm provider/model, not the named LM {settings.lm!r}"
                )
            await pool.configure_lm(**dspex_trio.NamedLM.from_config(lms[settings.lm]).configure_kwargs())
            return
        await pool.configure_lm(settings.lm, api_base=settings.lm_base_url, api_key=key)
    except dspex_trio.InvalidParams as exc:
        raise SettingsError(f"--lm {settings.lm}: {exc}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name, None) for name in SETTING_NAMES}
    settings = resolve_settings(file=args.config, environ=os.environ, flags=flags)
    keys = resolve_secrets(settings, os.environ)
    tls = server_ssl_context(settings)
    if args.token is not None and args.token != "auto":
        _warn("serve", "--token puts the token in the process list; prefer --token-file or DSPEX_TOKEN")
    for line in missing_key_warnings(settings, keys):
        _warn("serve", line)
    if settings.log_format != (args.log_format or "text"):  # DSPEX_LOG_FORMAT or the config file's
        _use_log_format(settings.log_format)
    monitoring = monitoring_from(settings)
    with serve_tracing(monitoring):
        return trio.run(_serve, settings, keys, tls, monitoring)


def _warn(command: str, text: str) -> None:
    _say(f"dspex-trio {command}: warning: {text}")


# -- run, status, demo -------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    inputs, text_inputs = parse_inputs(args.input, args.inputs_json)
    request = RunRequest(
        signature=args.signature,
        inputs=inputs,
        text_inputs=text_inputs,
        module=args.module,
        instructions=args.instructions,
        lm=args.lm or (None if args.url else os.environ.get("DSPEX_LM")),
        lm_base_url=args.lm_base_url or (None if args.url else os.environ.get("DSPEX_LM_BASE_URL")),
        lm_key_file=args.lm_api_key_file,
        timeout=args.timeout,
        url=args.url,
        token_file=args.token_file,
        json=args.json,
    )
    return trio.run(run_remote if request.url is not None else run_local, request)


def _cmd_status(args: argparse.Namespace) -> int:
    token = client_token(args.token, args.token_file, os.environ)
    return trio.run(
        partial(status, args.url, token, once=args.once, raw_json=args.json, timeout=args.timeout)
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    return trio.run(_demo, args)


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "serve": _cmd_serve,
    "run": _cmd_run,
    "status": _cmd_status,
    "demo": _cmd_demo,
}


# -- logging -----------------------------------------------------------------------------------------------


class _TextFormatter(logging.Formatter):
    """``2025-01-31 12:00:00,123 INFO websocket: ...``: the ``dspex_trio.`` prefix of our loggers dropped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(source)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.source = record.name.removeprefix("dspex_trio.")
        return super().format(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, what the
    line is about when it is known (``worker_id``, ``execution``, ``session``, ``trace_id``:
    ``_log_context.py``), and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **log_fields(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _use_log_format(log_format: str) -> None:
    """Switch the handler ``_configure_logging`` installed to ``log_format`` (serve's own setting)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, _TextFormatter | _JsonFormatter):
            handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())


def _configure_logging(verbose: int, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)], handlers=[handler]
    )
    if verbose == 2:  # trio-websocket logs every frame at DEBUG
        logging.getLogger("trio-websocket").setLevel(logging.INFO)


# -- the one error path ------------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc`` (itself, or inside nested exception groups), ``trio.Cancelled`` left out."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [] if isinstance(exc, trio.Cancelled) else [exc]


def _one_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def explain(exc: BaseException) -> str:
    """The one line for a failure: expected ones say the cause and the fix; others ask for ``-v``."""
    if isinstance(exc, CliError):
        return _one_line(str(exc))
    if isinstance(exc, dspex_trio.ProgramModuleError):  # it names the module and what is wrong
        return _one_line(str(exc))
    if isinstance(exc, dspex_trio.WorkerStartFailed):
        return f"the workers could not start: {_one_line(str(exc))} (-v shows their output)"
    if isinstance(exc, dspex_trio.DspexError):
        return f"{type(exc).__name__}: {_one_line(str(exc))}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or _one_line(str(exc))}{where}"
    detail = _one_line(str(exc))
    return f"unexpected {type(exc).__name__}{': ' + detail if detail else ''} (-v shows the traceback)"


def _main_cause(leaves: Sequence[BaseException]) -> BaseException:
    for kind in (CliError, dspex_trio.DspexError, OSError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


def _report(command: str, exc: BaseException, verbose: int) -> int:
    """Print the failure of ``command`` (the traceback first at ``-v``); the exit status."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    leaves = _leaves(exc) or [exc]
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        _say(f"dspex-trio {command}: interrupted")
        return EXIT_INTERRUPTED
    _say(f"dspex-trio {command}: error: {explain(_main_cause(leaves))}")
    return EXIT_ERROR


def _split_fake_lm(argv: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """``[global options] fake-lm REST``: (the arguments up to ``fake-lm``, REST), else None."""
    expects_value = False
    for i, arg in enumerate(argv):
        if expects_value:
            expects_value = False
        elif arg == "fake-lm":
            return list(argv[: i + 1]), list(argv[i + 1 :])
        elif arg in _GLOBAL_OPTIONS_WITH_VALUE:
            expects_value = True
        elif not arg.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fake_lm = _split_fake_lm(argv)
    args = _parser().parse_args(fake_lm[0] if fake_lm is not None else argv)
    _configure_logging(args.verbose, args.log_format or "text")
    try:
        if fake_lm is not None:
            from dspex_trio.testing._fake_lm import main as fake_lm_main

            return fake_lm_main(fake_lm[1])
        return _COMMANDS[args.command](args)
    except SystemExit:
        raise
    except BaseException as exc:  # the one error path: every failure ends here
        return _report(args.command, exc, args.verbose)
