"""``dspex-trio serve``'s monitoring flags: ``--metrics-token-file``, ``--http-port``, ``--tracing``,
``--no-http-routes``; each is also a config key and a ``DSPEX_*`` variable (``ServeSettings``).

``/metrics``, ``/healthz``, ``/readyz`` and the dashboard are answered on the websocket's port by
default; ``--http-port`` serves them on a port of their own too (same host, same token rules), and
``--no-http-routes`` turns them off on the websocket port (plain requests get ``426`` as before).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import attrs

from dspex_trio._cli_settings import ServeSettings, SettingsError, read_secret

__all__ = ["Monitoring", "add_monitoring_arguments", "monitoring_from", "serve_tracing"]


@attrs.frozen
class Monitoring:
    """What the monitoring flags asked for."""

    http_routes: bool = True
    """Answer the routes on the websocket's port."""
    http_port: int | None = None
    """Also serve them on this port (0: a free one)."""
    metrics_token: str | None = attrs.field(default=None, repr=False)
    """A scraper's own token for ``/metrics``."""
    tracing: bool = False
    """Trace executions with OpenTelemetry, configured by the standard ``OTEL_*`` variables."""


def add_monitoring_arguments(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("monitoring (docs/monitoring.md)")
    group.add_argument(
        "--metrics-token-file",
        default=None,
        metavar="PATH",
        help="read a scraper's token from PATH: it opens /metrics only (the client token opens it too)",
    )
    group.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve /metrics, /healthz, /readyz and the dashboard on PORT (same host and token rules)",
    )
    group.add_argument(
        "--tracing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="OpenTelemetry traces of every execution, configured by OTEL_TRACES_EXPORTER (otlp, console), "
        "OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...",
    )
    group.add_argument(
        "--no-http-routes",
        dest="http_routes",
        action="store_false",
        default=None,
        help="answer no monitoring route on the websocket's port (plain HTTP requests get 426)",
    )


def monitoring_from(settings: ServeSettings) -> Monitoring:
    """What the settings ask for (flags, ``DSPEX_*`` variables or config keys: ``_cli_settings.py``);
    the metrics token read from its file."""
    path = settings.metrics_token_file
    return Monitoring(
        http_routes=settings.http_routes,
        http_port=settings.http_port,
        metrics_token=read_secret(path, "metrics token") if path else None,
        tracing=settings.tracing,
    )


@contextlib.contextmanager
def serve_tracing(monitoring: Monitoring) -> Iterator[None]:
    """Around ``serve``: tracing configured from the environment when asked for, flushed and shut down
    at the end (``SettingsError`` naming what is missing when the exporter cannot be built)."""
    if not monitoring.tracing:
        yield
        return
    from dspex_trio import _tracing

    try:
        provider = _tracing.configure_from_environment()
    except (ImportError, RuntimeError) as exc:
        raise SettingsError(f"--tracing: {exc}") from None
    try:
        yield
    finally:
        _tracing.disable_tracing()
        provider.shutdown()
