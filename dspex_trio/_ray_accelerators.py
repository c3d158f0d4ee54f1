"""The accelerators (GPUs, ...) of a Ray worker's reservation, pinned in the worker forked for it.

A worker of ``RayLauncher`` reserves its resources as a one-bundle placement group, but it is forked by
its node's agent (``dspex_trio._ray_agent``), which holds no GPU: so Ray sets no ``CUDA_VISIBLE_DEVICES``
for it. When the bundle holds accelerators Ray assigns ids for (``GPU``, ``TPU``, ``neuron_cores``,
...), the launcher runs :func:`visible_accelerators` once as a Ray task in that bundle, with the
bundle's accelerators: Ray gives the task the bundle's devices and sets their variables in its
process, which the task reports (e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``). The agent passes them with
the spawn, and the forked worker sets them in its environment before it runs anything
(``bridge_child._zygote``: only ``bridge_child.tcp.ACCELERATOR_ENV`` names). The bundle keeps its
devices as long as the placement group lives, and nothing else runs in it, so the worker has them
alone.

Importing this module imports neither Ray nor Trio.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from bridge_child.tcp import ACCELERATOR_ENV

KNOWN_ACCELERATOR_VARIABLES: Final[Mapping[str, str]] = {"GPU": "CUDA_VISIBLE_DEVICES"}
"""What is assumed when Ray's (private) accelerator registry cannot be read."""


def accelerator_resource_names() -> frozenset[str]:
    """The resources Ray assigns device ids for (``GPU``, ``TPU``, ``neuron_cores``, ...)."""
    try:
        from ray._private.accelerators import get_all_accelerator_resource_names

        return frozenset(get_all_accelerator_resource_names())
    except (ImportError, AttributeError):  # pragma: no cover - another Ray than the tested ones
        return frozenset(KNOWN_ACCELERATOR_VARIABLES)


def accelerator_resources(bundle: Mapping[str, float]) -> dict[str, float]:
    """The part of a worker's ``bundle`` Ray assigns device ids for (empty: nothing to pin)."""
    names = accelerator_resource_names()
    return {name: amount for name, amount in bundle.items() if name in names and amount > 0}


def _variable(resource: str) -> str | None:
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource(resource)
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - another Ray
        return KNOWN_ACCELERATOR_VARIABLES.get(resource)
    name = manager.get_visible_accelerator_ids_env_var() if manager is not None else None
    return str(name) if name else None


def visible_accelerators() -> dict[str, str]:
    """Run by Ray as a task holding a worker's accelerators: the variables Ray set for them in this
    process (``ACCELERATOR_ENV`` names only). A variable Ray was told not to set
    (``RAY_EXPERIMENTAL_NOSET_*``) is not reported."""
    import ray

    env: dict[str, str] = {}
    for resource, ids in ray.get_runtime_context().get_accelerator_ids().items():
        name = _variable(resource) if ids else None
        if name is not None and name in ACCELERATOR_ENV and name in os.environ:
            env[name] = os.environ[name]
    return env
