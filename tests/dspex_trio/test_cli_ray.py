"""``serve --ray`` settings (``_cli_ray``), in-process: which ``open_pool`` keywords they give, and the
operator's mistakes named. The served pool on a real cluster: ``test_ray.py``."""

from __future__ import annotations

import importlib.util

import pytest

import dspex_trio
from dspex_trio._cli_ray import open_pool_launcher, parse_listen
from dspex_trio._cli_settings import SettingsError, resolve_settings


def settings(**flags: object):  # type: ignore[no-untyped-def]
    return resolve_settings(file=None, environ={}, flags=flags)


def test_listen_addresses() -> None:
    assert parse_listen("10.0.0.5:7700") == ("10.0.0.5", 7700)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("10.0.0.5", ":7700", "host:port", "h:70000"):
        with pytest.raises(SettingsError, match="ray_listen must be HOST:PORT"):
            parse_listen(bad)


async def test_without_ray_the_workers_are_local_and_get_worker_env() -> None:
    """Without ``ray``: the workers' warm template on this machine (started before the bind) and the
    operator's ``worker_env``."""
    async with open_pool_launcher(settings(worker_env=("A_VAR",))) as where:
        assert set(where) == {"launcher", "worker_env"}
        assert isinstance(where["launcher"], dspex_trio.SharedLauncher)
        assert where["worker_env"] == ("A_VAR",)


async def test_ray_listen_without_ray_is_a_mistake() -> None:
    with pytest.raises(SettingsError, match="ray_listen needs ray"):
        async with open_pool_launcher(settings(ray_listen="127.0.0.1:7700")):
            pass  # pragma: no cover


def test_the_settings_come_from_the_environment_too() -> None:
    got = resolve_settings(
        file=None, environ={"DSPEX_RAY": "auto", "DSPEX_RAY_LISTEN": "10.0.0.5:7700"}, flags={}
    )
    assert (got.ray, got.ray_listen) == ("auto", "10.0.0.5:7700")


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed")
async def test_without_the_extra_serve_ray_says_how_to_get_it() -> None:
    with pytest.raises(SettingsError, match=r"dspex-trio\[ray\]"):
        async with open_pool_launcher(settings(ray="auto")):
            pass  # pragma: no cover
