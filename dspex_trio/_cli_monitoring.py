"""``dspex-trio serve``'s monitoring flags: ``--metrics-token-file``, ``--http-port``, ``--no-http-routes``.

``/metrics``, ``/healthz``, ``/readyz`` and the dashboard are answered on the websocket's port by
default; ``--http-port`` serves them on a port of their own too (same host, same token rules), and
``--no-http-routes`` turns them off on the websocket port (plain requests get ``426`` as before).
"""

from __future__ import annotations

import argparse

import attrs

from dspex_trio._cli_settings import read_secret

__all__ = ["Monitoring", "add_monitoring_arguments", "monitoring_from"]


@attrs.frozen
class Monitoring:
    """What the monitoring flags asked for."""

    http_routes: bool = True
    """Answer the routes on the websocket's port."""
    http_port: int | None = None
    """Also serve them on this port (0: a free one)."""
    metrics_token: str | None = attrs.field(default=None, repr=False)
    """A scraper's own token for ``/metrics``."""


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
        "--no-http-routes",
        action="store_true",
        help="answer no monitoring route on the websocket's port (plain HTTP requests get 426)",
    )


def monitoring_from(args: argparse.Namespace) -> Monitoring:
    token = read_secret(args.metrics_token_file, "metrics token") if args.metrics_token_file else None
    return Monitoring(http_routes=not args.no_http_routes, http_port=args.http_port, metrics_token=token)
