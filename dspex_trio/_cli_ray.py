"""``dspex-trio serve --ray ADDRESS [--ray-listen HOST:PORT] [placement]``: the served pool's workers on a
Ray cluster.

:func:`open_pool_launcher` gives ``serve`` the keyword arguments of ``open_pool`` that choose where the
workers run: on this machine (``worker_env`` for the default launcher), or on Ray (a
:class:`~dspex_trio._ray_launcher.RayLauncher` opened for the life of the pool, its listener on
``ray_listen``). Each worker's Ray resources and node labels (``--ray-num-cpus``, ``--ray-num-gpus``,
``--ray-resource NAME=QTY``, ``--ray-label KEY=VALUE``; settings ``ray_num_cpus``... like the others) are
checked by :func:`ray_placement` and passed to the launcher. See docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import dspex_trio
from dspex_trio._cli_settings import ServeSettings, SettingsError

DEFAULT_RAY_LISTEN: Final = "127.0.0.1:0"
"""Where the workers connect when ``ray_listen`` is not set: loopback (a cluster on this machine)."""
MAX_RAY_RESOURCES: Final = 32
"""Most custom resources (``ray_resources``) per worker."""
MAX_RAY_LABELS: Final = 32
"""Most node labels (``ray_labels``) a worker's node is selected by."""
MAX_RAY_NAME_CHARS: Final = 253
"""Longest resource name or label key (Ray's label keys: a DNS prefix, ``/``, a name)."""
MAX_RAY_LABEL_VALUE_CHARS: Final = 1024
"""Longest label value as written (``in(a, b, ...)`` lists several)."""
BUILTIN_RESOURCES: Final = {"CPU": "ray_num_cpus", "GPU": "ray_num_gpus"}
"""Ray resources set by their own settings, not by ``ray_resources``."""
PLACEMENT_SETTINGS: Final = ("ray_num_cpus", "ray_num_gpus", "ray_resources", "ray_labels")
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_./-]*[A-Za-z0-9])?")
"""A label key: letters, digits, ``_ . / -`` inside."""
_RESOURCE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_./:-]*[A-Za-z0-9])?")
"""A resource name: a label key's characters and ``:`` (``accelerator_type:A100``, ``node:10.0.0.5``)."""
_LABEL_VALUE = re.compile(r"!?(?:[A-Za-z0-9_./-]+|in\([A-Za-z0-9_./, -]+\))")
"""A label selector's value: ``value``, ``!value``, ``in(a, b)``, ``!in(a, b)`` (Ray's syntax)."""


def add_ray_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve``'s flags for each Ray worker's resources and node labels (settings ``ray_num_cpus``...)."""
    parser.add_argument(
        "--ray-num-cpus",
        type=float,
        default=None,
        metavar="N",
        help="Ray CPUs reserved per worker (default 1; fractions allowed)",
    )
    parser.add_argument(
        "--ray-num-gpus",
        type=float,
        default=None,
        metavar="N",
        help="Ray GPUs reserved per worker (default 0); a worker sees only the GPUs Ray assigned it",
    )
    parser.add_argument(
        "--ray-resource",
        dest="ray_resources",
        action="append",
        default=None,
        metavar="NAME=QTY",
        help="a custom Ray resource reserved per worker, e.g. bigmem=1 (repeatable)",
    )
    parser.add_argument(
        "--ray-label",
        dest="ray_labels",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a node label a worker's node must have: KEY=VALUE, KEY=!VALUE, KEY=in(A,B) (repeatable)",
    )


def _quantity(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise SettingsError(f"invalid settings: {what} must be a non-negative number, not {value!r}")
    return float(value)


def parse_resource(text: str) -> tuple[str, float]:
    """``NAME=QUANTITY`` of ``ray_resources``; ``SettingsError`` naming what is wrong."""
    name, sep, quantity = text.partition("=")
    name, quantity = name.strip(), quantity.strip()
    if not sep or not name or not quantity:
        raise SettingsError(f"invalid settings: ray_resources: expected NAME=QUANTITY, not {text!r}")
    if name in BUILTIN_RESOURCES:
        raise SettingsError(
            f"invalid settings: ray_resources: {name} is set by {BUILTIN_RESOURCES[name]}, not here"
        )
    if len(name) > MAX_RAY_NAME_CHARS or not _RESOURCE.fullmatch(name):
        raise SettingsError(
            f"invalid settings: ray_resources: {name!r} is not a resource name (letters, digits, _ . / : -; "
            f"at most {MAX_RAY_NAME_CHARS} characters)"
        )
    try:
        amount = float(quantity)
    except ValueError:
        raise SettingsError(
            f"invalid settings: ray_resources: the quantity of {name} must be a number, not {quantity!r}"
        ) from None
    return name, _quantity(f"ray_resources: the quantity of {name}", amount)


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``ray_labels`` (VALUE: ``v``, ``!v``, ``in(a, b)``, ``!in(a, b)``)."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key or not value:
        raise SettingsError(f"invalid settings: ray_labels: expected KEY=VALUE, not {text!r}")
    if len(key) > MAX_RAY_NAME_CHARS or not _NAME.fullmatch(key):
        raise SettingsError(
            f"invalid settings: ray_labels: {key!r} is not a label key (letters, digits, _ . / -; "
            f"at most {MAX_RAY_NAME_CHARS} characters)"
        )
    if len(value) > MAX_RAY_LABEL_VALUE_CHARS or not _LABEL_VALUE.fullmatch(value):
        raise SettingsError(
            f"invalid settings: ray_labels: the value of {key} must be VALUE, !VALUE, in(A, B) or "
            f"!in(A, B), not {value!r}"
        )
    return key, value


def ray_placement(settings: ServeSettings) -> dict[str, Any]:
    """The ``RayLauncher`` keywords of ``settings``' placement settings (only those set);
    ``SettingsError`` for a negative or malformed value, a name given twice, too many, or any of them
    without ``ray``."""
    given = [name for name in PLACEMENT_SETTINGS if getattr(settings, name) not in (None, ())]
    if settings.ray is None:
        if given:
            raise SettingsError(
                f"invalid settings: {', '.join(given)} need(s) ray (the Ray cluster's address)"
            )
        return {}
    placement: dict[str, Any] = {}
    if settings.ray_num_cpus is not None:
        placement["num_cpus"] = _quantity("ray_num_cpus", settings.ray_num_cpus)
    if settings.ray_num_gpus is not None:
        placement["num_gpus"] = _quantity("ray_num_gpus", settings.ray_num_gpus)
    for setting, parse, limit, keyword in (
        ("ray_resources", parse_resource, MAX_RAY_RESOURCES, "resources"),
        ("ray_labels", parse_label, MAX_RAY_LABELS, "label_selector"),
    ):
        items: tuple[str, ...] = getattr(settings, setting)
        if len(items) > limit:
            raise SettingsError(f"invalid settings: {setting}: at most {limit}, not {len(items)}")
        parsed: dict[str, Any] = {}
        for text in items:
            name, value = parse(text)
            if name in parsed:
                raise SettingsError(f"invalid settings: {setting}: {name} is given twice")
            parsed[name] = value
        if parsed:
            placement[keyword] = parsed
    return placement


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
    placement = ray_placement(settings)
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
            address=settings.ray,
            listen_host=host,
            listen_port=port,
            worker_env=settings.worker_env,
            **placement,
        )
    except ValueError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
    try:
        import ray  # noqa: F401 - only to say how to get it
    except ImportError:
        raise SettingsError(INSTALL_HINT) from None
    async with launcher:
        yield {"launcher": launcher}
