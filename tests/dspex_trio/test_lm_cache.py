"""The pool's LM cache settings (``dspex_trio._lm_cache``): ``LMCache`` and its text form, the worker's
arguments, the serve setting, and which mode an execution asks for (call, session, pool)."""

from __future__ import annotations

import pytest

from bridge_child._lmcache import MIN_DISK_BYTES
from bridge_child._server import parse_args
from dspex_trio import InvalidParams, LMCache
from dspex_trio._cli_settings import SettingsError, resolve_settings
from dspex_trio._lm_cache import (
    DEFAULT_DISK_BYTES,
    DEFAULT_MEMORY_ENTRIES,
    lm_cache_mode,
    parse_lm_cache,
    set_session_lm_cache,
)
from dspex_trio._sessions import SessionStore


def test_defaults_and_the_workers_arguments() -> None:
    cache = LMCache()
    assert (cache.memory_entries, cache.directory, cache.mode) == (DEFAULT_MEMORY_ENTRIES, None, "read_write")
    args = parse_args(cache.argv())
    assert (args.lm_cache_entries, args.lm_cache_dir, args.lm_cache_mode) == (
        DEFAULT_MEMORY_ENTRIES,
        None,
        "read_write",
    )
    disk = LMCache(memory_entries=10, directory="cache-dir", disk_bytes=MIN_DISK_BYTES, mode="read_only")
    args = parse_args(disk.argv())
    assert args.lm_cache_dir.endswith("cache-dir") and args.lm_cache_dir.startswith("/")
    assert (args.lm_cache_disk_bytes, args.lm_cache_mode) == (MIN_DISK_BYTES, "read_only")


@pytest.mark.parametrize(
    "fields",
    [
        {"memory_entries": 0},
        {"memory_entries": 10**9},
        {"memory_entries": True},
        {"disk_bytes": 1024},
        {"mode": "sometimes"},
        {"directory": " "},
    ],
)
def test_bad_settings_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LMCache(**fields)  # type: ignore[arg-type]


def test_the_text_form() -> None:
    assert parse_lm_cache("on") == LMCache()
    assert parse_lm_cache("entries=10 dir=d disk_mb=64 mode=off") == LMCache(
        memory_entries=10, directory="d", disk_bytes=64 * 1024 * 1024, mode="off"
    )
    assert parse_lm_cache("dir=d").disk_bytes == DEFAULT_DISK_BYTES
    for bad in ("entries", "size=3", "entries=x", "disk_mb=1", "x" * 5000):
        with pytest.raises(ValueError):
            parse_lm_cache(bad)


def test_the_serve_setting() -> None:
    settings = resolve_settings(file=None, environ={"DSPEX_LM_CACHE": "entries=5"}, flags={})
    assert settings.lm_cache == "entries=5"
    assert resolve_settings(file=None, environ={}, flags={}).lm_cache is None
    with pytest.raises(SettingsError, match="lm_cache"):
        resolve_settings(file=None, environ={}, flags={"lm_cache": "mode=sometimes"})


def test_the_mode_an_execution_asks_for() -> None:
    store = SessionStore(clock=lambda: 0.0)
    assert lm_cache_mode(None, None) is None  # the worker's (the pool's LMCache.mode)
    assert lm_cache_mode(None, "off") == "off"
    set_session_lm_cache(store, "s", "read_only")
    session = store.peek("s")
    assert lm_cache_mode(session, None) == "read_only"
    assert lm_cache_mode(session, "read_write") == "read_write"  # the call's wins
    set_session_lm_cache(store, "s", None)
    assert lm_cache_mode(store.peek("s"), None) is None
    with pytest.raises(InvalidParams):
        lm_cache_mode(None, "always")
    with pytest.raises(InvalidParams):
        set_session_lm_cache(store, "s", "always")
    with pytest.raises(InvalidParams):
        set_session_lm_cache(store, None, "off")
