"""Testing tools for applications that embed dspex-trio: the pytest plugin and the fake LM server.

- The pytest plugin (``dspex_trio.testing._plugin``), registered through the ``pytest11`` entry point
  ``dspex_trio`` as this module: installing dspex-trio is enough (``-p no:dspex_trio`` turns it off).
  Its hooks and fixtures (``dspex_backend``, ``dspex_pool``, ``dspex_fake_lm``, ``dspex_ws_client``,
  ``dspex_layer``, ``dspex_pool_options``) and names (:class:`WebsocketClient`, :class:`RpcError`,
  :class:`DspexLeakWarning`, ``LAYERS``, ``ENV_VAR``) are all here. See ``docs/testing.md``.
- The fake OpenAI-compatible LM server (``dspex_trio.testing._fake_lm``): :func:`open_fake_lm`,
  :func:`serve_fake_lm`, :class:`FakeLM`, :class:`FakeLMConfig`, :class:`FakeLMStatistics`;
  ``dspex-trio fake-lm`` on the command line.

The fake LM needs no pytest (``dspex-trio fake-lm`` works without the ``test`` extra), so the plugin is
only imported when pytest is.
"""

from dspex_trio.testing._fake_lm import FakeLM as FakeLM
from dspex_trio.testing._fake_lm import FakeLMConfig as FakeLMConfig
from dspex_trio.testing._fake_lm import FakeLMStatistics as FakeLMStatistics
from dspex_trio.testing._fake_lm import open_fake_lm as open_fake_lm
from dspex_trio.testing._fake_lm import serve_fake_lm as serve_fake_lm

try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - pytest is in the "test" extra
    _pytest = None  # type: ignore[assignment]

if _pytest is not None:
    # The plugin: pytest finds its hooks and fixtures by name on this module, the private ones too.
    from dspex_trio.testing._plugin import ENV_VAR as ENV_VAR
    from dspex_trio.testing._plugin import LAYERS as LAYERS
    from dspex_trio.testing._plugin import DspexLeakWarning as DspexLeakWarning
    from dspex_trio.testing._plugin import RpcError as RpcError
    from dspex_trio.testing._plugin import WebsocketClient as WebsocketClient
    from dspex_trio.testing._plugin import _dspex_backend_layer as _dspex_backend_layer
    from dspex_trio.testing._plugin import _dspex_launcher as _dspex_launcher
    from dspex_trio.testing._plugin import _dspex_no_leaks as _dspex_no_leaks
    from dspex_trio.testing._plugin import _dspex_pool_requirements as _dspex_pool_requirements
    from dspex_trio.testing._plugin import _dspex_remote as _dspex_remote
    from dspex_trio.testing._plugin import dspex_backend as dspex_backend
    from dspex_trio.testing._plugin import dspex_fake_lm as dspex_fake_lm
    from dspex_trio.testing._plugin import dspex_layer as dspex_layer
    from dspex_trio.testing._plugin import dspex_pool as dspex_pool
    from dspex_trio.testing._plugin import dspex_pool_options as dspex_pool_options
    from dspex_trio.testing._plugin import dspex_ws_client as dspex_ws_client
    from dspex_trio.testing._plugin import pytest_addoption as pytest_addoption
    from dspex_trio.testing._plugin import pytest_collection_modifyitems as pytest_collection_modifyitems
    from dspex_trio.testing._plugin import pytest_configure as pytest_configure
    from dspex_trio.testing._plugin import pytest_sessionfinish as pytest_sessionfinish
    from dspex_trio.testing._plugin import warm_templates_by_default as warm_templates_by_default

__all__ = [
    "ENV_VAR",
    "LAYERS",
    "DspexLeakWarning",
    "FakeLM",
    "FakeLMConfig",
    "FakeLMStatistics",
    "RpcError",
    "WebsocketClient",
    "open_fake_lm",
    "serve_fake_lm",
    "warm_templates_by_default",
]
