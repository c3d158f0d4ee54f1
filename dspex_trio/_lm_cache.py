"""The pool's LM answer cache, as the operator configures it: DSPy's response cache in every worker,
bounded in memory per worker and, optionally, on disk in one directory shared by the pool's workers
with a size cap (the worker's side: ``bridge_child._lmcache``; docs/lm.md, "Cache").

``open_pool(lm_cache=LMCache(...))``; ``dspex-trio serve --lm-cache SPEC``; ``DSPEX_LM_CACHE``;
``lm_cache = "SPEC"`` in the config file. The text form is ``[entries=N] [dir=PATH] [disk_mb=N]
[mode=read_write|read_only|off]`` (``on`` alone: the defaults).
"""

from __future__ import annotations

import os
from typing import Any, Final

import attrs

from bridge_child.spec import LM_CACHE_DEFAULT_MODE as DEFAULT_MODE
from bridge_child.spec import LM_CACHE_MAX_ENTRIES as MAX_MEMORY_ENTRIES
from bridge_child.spec import LM_CACHE_MIN_DISK_BYTES as MIN_DISK_BYTES
from bridge_child.spec import LM_CACHE_MODES as MODES
from dspex_trio._errors import InvalidParams
from dspex_trio._sessions import Session, SessionStore

DEFAULT_MEMORY_ENTRIES: Final = 4096
"""LM answers each worker keeps in memory (least recently used dropped first), a count."""
DEFAULT_DISK_BYTES: Final = 256 * 1024 * 1024
"""The shared disk cache's cap, in bytes, when a directory is given without one."""
MAX_TEXT_CHARS: Final = 4096
"""The longest ``--lm-cache`` text accepted, in characters."""


def _mode(instance: Any, attribute: Any, value: Any) -> None:
    if value not in MODES:
        raise ValueError(f"{attribute.name} must be one of {', '.join(MODES)}, not {value!r}")


def _entries(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MEMORY_ENTRIES:
        raise ValueError(f"{attribute.name} must be an int from 1 to {MAX_MEMORY_ENTRIES}, not {value!r}")


def _disk_bytes(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_DISK_BYTES:
        raise ValueError(f"{attribute.name} must be an int of at least {MIN_DISK_BYTES} bytes, not {value!r}")


@attrs.frozen
class LMCache:
    """How the pool's workers cache LM answers.

    ``memory_entries`` answers per worker in memory; with ``directory``, a disk cache there shared by
    every worker of the pool, at most ``disk_bytes`` bytes (SQLite's files included); ``mode`` the
    default of calls that do not choose (``read_write``, ``read_only`` or ``off``). Answers are keyed by
    the request (model, API base, messages, settings) without its API key; a cache file holds no key.
    """

    memory_entries: int = attrs.field(default=DEFAULT_MEMORY_ENTRIES, validator=_entries)
    directory: str | None = attrs.field(default=None, converter=attrs.converters.optional(os.fspath))
    disk_bytes: int = attrs.field(default=DEFAULT_DISK_BYTES, validator=_disk_bytes)
    mode: str = attrs.field(default=DEFAULT_MODE, validator=_mode)

    def __attrs_post_init__(self) -> None:
        if self.directory is not None and not self.directory.strip():
            raise ValueError("directory must name a directory (or be None: no disk cache)")

    def argv(self) -> list[str]:
        """The worker's command-line arguments (``bridge_child._server.parse_args``)."""
        args = ["--lm-cache-entries", str(self.memory_entries), "--lm-cache-mode", self.mode]
        if self.directory is not None:
            args += ["--lm-cache-dir", os.path.abspath(self.directory)]
            args += ["--lm-cache-disk-bytes", str(self.disk_bytes)]
        return args


def parse_lm_cache(text: str) -> LMCache:
    """An :class:`LMCache` from its text form (module docstring).

    Raises:
        ValueError: an unknown or malformed field (the message names it).
    """
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"an LM cache setting is at most {MAX_TEXT_CHARS} characters")
    fields: dict[str, Any] = {}
    for part in text.split():
        if part == "on":
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"LM cache setting {part!r} is not NAME=VALUE")
        try:
            if name == "entries":
                fields["memory_entries"] = int(value)
            elif name == "dir":
                fields["directory"] = value
            elif name == "disk_mb":
                fields["disk_bytes"] = int(float(value) * 1024 * 1024)
            elif name == "mode":
                fields["mode"] = value
            else:
                raise ValueError(f"unknown LM cache setting {name!r} (entries, dir, disk_mb, mode)")
        except ValueError as exc:
            if "unknown" in str(exc):
                raise
            raise ValueError(f"LM cache setting {part!r}: {exc}") from None
    return LMCache(**fields)


def check_lm_cache_mode(mode: Any) -> str:
    """``mode`` if it is one of ``read_write``, ``read_only``, ``off``.

    Raises:
        InvalidParams: anything else (the message lists the modes).
    """
    if not isinstance(mode, str) or mode not in MODES:
        shown = repr(mode)[:64]
        raise InvalidParams(f"lm_cache must be one of {', '.join(MODES)}, not {shown}")
    return mode


def lm_cache_mode(session: Session | None, call_mode: str | None) -> str | None:
    """The mode an execution asks its worker for: the call's, else its session's, else None (the
    worker's, i.e. the pool's ``LMCache.mode``)."""
    if call_mode is not None:
        return check_lm_cache_mode(call_mode)
    return None if session is None else session.lm_cache


def set_session_lm_cache(sessions: SessionStore, session_id: str | None, mode: str | None) -> None:
    """Set (None: clear) a session's mode. Without a session there is nothing to set: the pool's
    default is its ``LMCache.mode`` (``InvalidParams``)."""
    if session_id is None:
        raise InvalidParams("the LM cache mode is set per session (the pool's default is LMCache.mode)")
    sessions.session(session_id).lm_cache = None if mode is None else check_lm_cache_mode(mode)
