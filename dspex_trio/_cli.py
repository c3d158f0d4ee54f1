"""The ``dspex-trio`` command line (also ``python -m dspex_trio``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final

import attrs
import cattrs
import trio
import trio_websocket

import dspex_trio
from dspex_trio._websocket import SUBPROTOCOL, is_loopback

DRAIN_GRACE_S: Final = 10.0
"""On SIGTERM or a first Ctrl-C, seconds running executions get to finish before they are cancelled."""
ENV_PREFIX: Final = "DSPEX_"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspex-trio", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="start a pool, run calls through it, print its statistics")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--calls", type=int, default=2000, help="concurrent no-op calls to run")
    demo.add_argument("--launcher", choices=["auto", "zygote", "subprocess"], default="auto")
    serve = commands.add_parser(
        "serve",
        help="serve a pool over websockets (JSON-RPC 2.0, subprotocol dspex.v1)",
        description="Serve a pool over websockets. Settings: defaults < --config file < DSPEX_* environment "
        "< flags. The LM key comes from DSPEX_LM_API_KEY or OPENAI_API_KEY.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML file with any of: " + ", ".join(_SETTING_NAMES))
    serve.add_argument(
        "--host", default=None, help="address to bind (default 127.0.0.1; others need a token)"
    )
    serve.add_argument("--port", type=int, default=None, help="port (default 8765; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=None, help="worker processes (default 2)")
    serve.add_argument("--lm", default=None, help="'offline' (default: the embedded LM) or provider/model")
    serve.add_argument("--lm-base-url", default=None, help="base URL of an OpenAI-compatible endpoint")
    serve.add_argument("--token", default=None, help="bearer token clients must send (needed off loopback)")
    serve.add_argument(
        "--diagnostics", action=argparse.BooleanOptionalAction, default=None, help="enable diagnostic methods"
    )
    serve.add_argument("--drain-grace", type=float, default=None, help=f"seconds (default {DRAIN_GRACE_S:g})")

    run = commands.add_parser(
        "run",
        help="create and run one program from the shell, streaming to the terminal",
        description='Example: dspex-trio run "question -> answer" --input question="What is DSPy?"',
    )
    run.add_argument("signature", help='a DSPy signature, e.g. "question -> answer, confidence: float"')
    run.add_argument(
        "--input", "-i", action="append", default=[], metavar="NAME=VALUE", help="an input (a string)"
    )
    run.add_argument("--inputs-json", metavar="JSON", help="inputs as a JSON object (for typed inputs)")
    run.add_argument("--module", default="predict", choices=["predict", "chain_of_thought"])
    run.add_argument("--instructions", default=None)
    run.add_argument("--lm", default=None, help="'offline' (default) or provider/model (DSPEX_LM)")
    run.add_argument("--lm-base-url", default=None, help="OpenAI-compatible base URL (DSPEX_LM_BASE_URL)")
    run.add_argument("--timeout", type=float, default=None, help="seconds")
    run.add_argument("--json", action="store_true", help="print the outputs as one JSON object at the end")

    status = commands.add_parser("status", help="connect to a server and show its live health")
    status.add_argument("--url", default=None, help="default ws://DSPEX_HOST:DSPEX_PORT (127.0.0.1:8765)")
    status.add_argument("--token", default=None, help="bearer token (default DSPEX_TOKEN)")
    status.add_argument("--once", action="store_true", help="print the snapshot and exit")
    status.add_argument("--json", action="store_true", help="print raw JSON messages")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to connect and get the snapshot")

    fake = commands.add_parser(
        "fake-lm", help="serve a small OpenAI-compatible LM for tests and benchmarks", add_help=False
    )
    fake.add_argument("rest", nargs=argparse.REMAINDER)
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


# -- settings: defaults < file < environment < flags ---------------------------------------------------


@attrs.frozen(kw_only=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    workers: int = 2
    lm: str | None = None
    """None or "offline": the embedded offline LM."""
    lm_base_url: str | None = None
    token: str | None = attrs.field(default=None, repr=False)
    diagnostics: bool = False
    drain_grace: float = DRAIN_GRACE_S


attrs.resolve_types(ServeSettings)
_SETTING_NAMES: Final = tuple(a.name for a in attrs.fields(ServeSettings))
_settings_converter = cattrs.Converter(forbid_extra_keys=True)


class SettingsError(ValueError):
    """A setting (from the file, the environment or a flag) is invalid."""


def _parse_env_value(name: str, raw: str) -> Any:
    field_type = attrs.fields_dict(ServeSettings)[name].type
    if field_type is int:
        return int(raw)
    if field_type is float:
        return float(raw)
    if field_type is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean (1/0, true/false), not {raw!r}")
    return raw


def resolve_settings(
    *, file: str | None, environ: Mapping[str, str], flags: Mapping[str, Any]
) -> ServeSettings:
    """Merge the settings: defaults < TOML ``file`` < ``DSPEX_*`` environment < ``flags`` (None: unset).

    Raises:
        SettingsError: an unreadable file, an unknown key, or a value of the wrong type.
    """
    merged: dict[str, Any] = {}
    if file is not None:
        try:
            with open(file, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {file}: {exc}") from None
        table = {key.replace("-", "_"): value for key, value in table.items()}
        unknown = sorted(set(table) - set(_SETTING_NAMES))
        if unknown:
            raise SettingsError(
                f"config file {file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_SETTING_NAMES)}"
            )
        merged.update(table)
    for name in _SETTING_NAMES:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            try:
                merged[name] = _parse_env_value(name, raw)
            except ValueError as exc:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}: {exc}") from None
    merged.update({k: v for k, v in flags.items() if v is not None})
    try:
        settings = _settings_converter.structure(merged, ServeSettings)
    except Exception as exc:
        details = (
            "; ".join(cattrs.transform_error(exc)) if isinstance(exc, cattrs.BaseValidationError) else exc
        )
        raise SettingsError(f"invalid settings: {details}") from None
    if not 0 <= settings.port <= 65535:
        raise SettingsError(f"invalid settings: port must be 0-65535, not {settings.port}")
    if settings.workers < 1:
        raise SettingsError(f"invalid settings: workers must be >= 1, not {settings.workers}")
    if not (settings.drain_grace >= 0 and math.isfinite(settings.drain_grace)):
        raise SettingsError(f"invalid settings: drain_grace must be >= 0 s, not {settings.drain_grace}")
    return settings


def _lm_key(environ: Mapping[str, str]) -> str | None:
    return environ.get("DSPEX_LM_API_KEY") or environ.get("OPENAI_API_KEY") or None


async def _configure_lm(pool: dspex_trio.Pool, lm: str | None, base_url: str | None) -> None:
    if lm is None or lm == "offline":
        if base_url is not None:
            raise SettingsError("--lm-base-url needs --lm provider/model")
        return
    await pool.configure_lm(lm, api_base=base_url, api_key=_lm_key(os.environ))


# -- serve -------------------------------------------------------------------------------------------------


async def _serve(settings: ServeSettings) -> int:
    if settings.token is None and not is_loopback(settings.host):
        raise SettingsError(
            f"refusing to serve on {settings.host!r} without a token: set --token (or DSPEX_TOKEN), "
            "or bind 127.0.0.1"
        )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with dspex_trio.open_pool(workers=settings.workers, diagnostics=settings.diagnostics) as pool:
            await _configure_lm(pool, settings.lm, settings.lm_base_url)
            async with trio.open_nursery() as nursery:
                server = await nursery.start(
                    partial(
                        dspex_trio.serve_websocket, pool, settings.host, settings.port, token=settings.token
                    )
                )
                print(f"dspex-trio serving {server.url} (subprotocol {SUBPROTOCOL})", flush=True)
                first = await signals.__anext__()
                print(
                    f"{signal.Signals(first).name}: draining (up to {settings.drain_grace:g} s; "
                    "Ctrl-C again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )
                interrupted = False
                async with trio.open_nursery() as draining:

                    async def second_signal() -> None:
                        nonlocal interrupted
                        await signals.__anext__()
                        interrupted = True
                        draining.cancel_scope.cancel()

                    draining.start_soon(second_signal)
                    with trio.move_on_after(settings.drain_grace):
                        await server.drain()
                    draining.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
    print("dspex-trio stopped" + (" (interrupted)" if interrupted else ""), file=sys.stderr, flush=True)
    return 130 if interrupted else 0


# -- run ---------------------------------------------------------------------------------------------------


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    if args.inputs_json is not None:
        loaded = json.loads(args.inputs_json)
        if not isinstance(loaded, dict):
            raise SettingsError("--inputs-json must be a JSON object")
        inputs.update(loaded)
    for item in args.input:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SettingsError(f"--input takes NAME=VALUE, not {item!r}")
        inputs[name.strip()] = value
    return inputs


async def _run(args: argparse.Namespace) -> int:
    inputs = _inputs(args)
    lm = args.lm or os.environ.get("DSPEX_LM")
    base_url = args.lm_base_url or os.environ.get("DSPEX_LM_BASE_URL")
    out = sys.stdout
    async with dspex_trio.open_pool(workers=1) as pool:
        await _configure_lm(pool, lm, base_url)
        program = await pool.create_program(
            args.signature, module=args.module, instructions=args.instructions, session="cli"
        )
        field: str | None = None
        streamed: set[str] = set()
        outputs: dict[str, Any] = {}
        async with pool.stream(program, inputs, session="cli", timeout=args.timeout) as events:
            async for event in events:
                if event["event"] == "chunk" and not args.json:
                    if event["field"] != field:
                        out.write(("\n" if field is not None else "") + f"{event['field']}: ")
                        field = event["field"]
                        streamed.add(field)
                    out.write(str(event["chunk"]))
                    out.flush()
                elif event["event"] == "completed":
                    outputs = event["outputs"]
        if args.json:
            print(json.dumps(outputs, ensure_ascii=False))
            return 0
        if field is not None:
            out.write("\n")
        for name, value in outputs.items():
            if name not in streamed:
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                out.write(f"{name}: {text}\n")
        out.flush()
    return 0


# -- status ------------------------------------------------------------------------------------------------


def _describe_snapshot(snapshot: Mapping[str, Any]) -> str:
    lines = [
        f"pool: {len(snapshot['workers'])}/{snapshot['size']} workers, circuit {snapshot['circuit']}"
        + (f" ({snapshot['circuit_reason']})" if snapshot.get("circuit_reason") else "")
        + f", launcher {snapshot['launcher']}, restarts {snapshot['restarts']}"
    ]
    for w in snapshot["workers"]:
        lines.append(
            f"  {w['worker_id']:<8} pid {w['pid']:<8} {w['state']:<9} in flight {w['in_flight']:<4}"
            f" last heard {w['last_heartbeat_age']:.2f} s ago" + (" (retiring)" if w["retiring"] else "")
        )
    return "\n".join(lines)


def _describe_event(event: str, data: Mapping[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(data.get("time", time.time())))
    if event == "worker_state":
        return f"{stamp} worker {data['worker_id']} (pid {data['pid']}): {data['from']} -> {data['to']}" + (
            f" ({data['reason']})" if data.get("reason") else ""
        )
    if event == "circuit":
        return f"{stamp} circuit {data['from']} -> {data['to']}" + (
            f" ({data['reason']})" if data.get("reason") else ""
        )
    if event == "lagged":
        return f"{stamp} missed {data.get('missed')} events; resyncing"
    if event == "snapshot":
        return _describe_snapshot(data)
    return f"{stamp} {event} {json.dumps(dict(data))}"


async def _status(args: argparse.Namespace, nursery: trio.Nursery) -> int:
    url = args.url
    if url is None:
        host = os.environ.get("DSPEX_HOST", "127.0.0.1")
        port = os.environ.get("DSPEX_PORT", "8765")
        url = f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"
    token = args.token or os.environ.get("DSPEX_TOKEN")
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    try:
        with trio.fail_after(args.timeout):
            connection = await trio_websocket.connect_websocket_url(
                nursery, url, subprotocols=[SUBPROTOCOL], extra_headers=headers
            )
    except trio_websocket.ConnectionRejected as exc:
        print(f"error: {url} refused the connection (HTTP {exc.status_code})", file=sys.stderr)
        return 1
    except (OSError, trio_websocket.HandshakeError, trio.TooSlowError) as exc:
        print(f"error: cannot connect to {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    async with connection:
        await connection.send_message(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "health/subscribe", "params": {}})
        )
        try:
            while True:
                message = json.loads(await connection.get_message())
                if args.json:
                    print(json.dumps(message), flush=True)
                if message.get("id") == 1:
                    if "error" in message:
                        print(f"error: {message['error']['message']}", file=sys.stderr)
                        return 1
                    if not args.json:
                        print(_describe_snapshot(message["result"]["snapshot"]), flush=True)
                    if args.once:
                        return 0
                elif message.get("method") == "health/event" and not args.json:
                    params = message["params"]
                    print(_describe_event(params["event"], params["data"]), flush=True)
        except trio_websocket.ConnectionClosed as exc:
            print(f"connection closed: {exc.reason}", file=sys.stderr)
            return 1


def _find(
    exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` (itself, or nested in exception groups)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


async def _status_main(args: argparse.Namespace) -> int:
    try:
        async with trio.open_nursery() as nursery:
            try:
                return await _status(args, nursery)
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        rejected = _find(group, trio_websocket.ConnectionRejected)
        if isinstance(rejected, trio_websocket.ConnectionRejected):
            print(f"error: the server refused the connection (HTTP {rejected.status_code})", file=sys.stderr)
            return 1
        failed = _find(group, (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed))
        if failed is not None:
            print(f"error: {failed or type(failed).__name__}", file=sys.stderr)
            return 1
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fake-lm"]:
        from dspex_trio._fake_lm import main as fake_lm_main

        return fake_lm_main(argv[1:])
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command == "demo":
            return trio.run(_demo, args)
        if args.command == "serve":
            flags = {name: getattr(args, name, None) for name in _SETTING_NAMES}
            settings = resolve_settings(file=args.config, environ=os.environ, flags=flags)
            return trio.run(_serve, settings)
        if args.command == "run":
            return trio.run(_run, args)
        if args.command == "status":
            return trio.run(_status_main, args)
    except KeyboardInterrupt:
        return 130
    except (SettingsError, ValueError, dspex_trio.DspexError) as exc:
        print(f"dspex-trio {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 2
