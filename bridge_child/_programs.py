"""DSPy in the worker: imported lazily, so importing ``bridge_child`` never imports dspy."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from bridge_child._methods import Method

METHODS: Final[dict[str, Method]] = {}
"""The DSPy methods (programs, LMs); registered by the program layer."""


def preload() -> None:
    """Import dspy and what it loads lazily, so a forked worker pays none of it on its first call.

    Safe before ``fork``: starts no thread, opens no cache and no network client, imports no litellm.
    """
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    import dspy

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    for name in ("anyio._backends._trio", "anyio.from_thread", "dspy.clients.costs"):
        try:
            __import__(name)
        except ImportError:  # pragma: no cover - optional pieces of other versions
            pass
    assert "litellm" not in sys.modules, "preloading dspy imported litellm"
