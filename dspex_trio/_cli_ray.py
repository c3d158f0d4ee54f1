"""``dspex-trio serve --ray ADDRESS [--ray-listen HOST:PORT]``: the served pool's workers on a Ray cluster.

:func:`open_pool_launcher` gives ``serve`` the keyword arguments of ``open_pool`` that choose where the
workers run: on this machine (``worker_env`` for the default launcher), or on Ray (a
:class:`~dspex_trio._ray_launcher.RayLauncher` opened for the life of the pool, its listener on
``ray_listen``). See docs/scale-out.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import dspex_trio
from dspex_trio._cli_settings import ServeSettings, SettingsError

DEFAULT_RAY_LISTEN: Final = "127.0.0.1:0"
"""Where the workers connect when ``ray_listen`` is not set: loopback (a cluster on this machine)."""


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) of ``--ray-listen``; ``SettingsError`` if it is not one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"invalid settings: ray_listen must be HOST:PORT, not {text!r}")
    return host, int(port)


@asynccontextmanager
async def open_pool_launcher(settings: ServeSettings) -> AsyncIterator[dict[str, Any]]:
    """The ``open_pool`` keywords for ``settings``: on this machine, the workers' zygote template (started
    at once: it imports dspy and the program modules in the background) and ``worker_env``; with
    ``ray``, a :class:`RayLauncher`."""
    if settings.ray is None:
        if settings.ray_listen is not None:
            raise SettingsError("invalid settings: ray_listen needs ray (the Ray cluster's address)")
        async with dspex_trio.open_launcher(
            "auto", worker_env=settings.worker_env, programs=settings.programs
        ) as shared:
            yield {"launcher": shared, "worker_env": settings.worker_env}
        return
    from dspex_trio._ray_launcher import INSTALL_HINT, RayLauncher

    host, port = parse_listen(settings.ray_listen or DEFAULT_RAY_LISTEN)
    try:
        launcher = RayLauncher(
            address=settings.ray, listen_host=host, listen_port=port, worker_env=settings.worker_env
        )
    except ValueError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
    try:
        import ray  # noqa: F401 - only to say how to get it
    except ImportError:
        raise SettingsError(INSTALL_HINT) from None
    async with launcher:
        yield {"launcher": launcher}
