"""The worker's program cache: workers only cache what the host owns.

A call that runs a program carries ``params["program"] = {"id", "version"[, "spec"]}``. The worker looks
up ``(id, version)``; on a miss it materialises the program from ``spec`` when the call carries it, and
otherwise fails with ``cache_miss`` so the host resends the call with the spec.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from bridge_child import wire
from bridge_child._context import CallContext, MethodError, invalid_params

if TYPE_CHECKING:
    from bridge_child._server import Worker

MAX_CACHED_PROGRAMS: Final = 4096
"""Materialised programs kept per worker (least recently used dropped first)."""


class ProgramCache:
    def __init__(self, max_entries: int = MAX_CACHED_PROGRAMS) -> None:
        self._entries: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def resolve(self, ctx: CallContext, materialize: Callable[[dict[str, Any]], Any]) -> tuple[str, Any]:
        """The program the call names, as ``(id, materialised object)``."""
        ref = ctx.param("program", dict)
        program_id = ref.get("id")
        version = ref.get("version")
        if not isinstance(program_id, str) or not isinstance(version, int):
            raise invalid_params(f"{ctx.method}: program must be {{'id': str, 'version': int, ...}}")
        with self._lock:
            entry = self._entries.get(program_id)
            if entry is not None and entry[0] == version:
                self._entries.move_to_end(program_id)
                self.hits += 1
                return program_id, entry[1]
            self.misses += 1
        spec = ref.get("spec")
        if spec is None:
            raise MethodError(
                wire.ErrorCode.CACHE_MISS, f"program {program_id} v{version} is not cached here"
            )
        if not isinstance(spec, dict):
            raise invalid_params(f"{ctx.method}: program spec must be an object")
        program = materialize(spec)
        with self._lock:
            self._entries[program_id] = (version, program)
            self._entries.move_to_end(program_id)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return program_id, program

    def uses_tools(self, ref: Any) -> bool:
        """Whether the program a call names (``params["program"]``) calls registered tools (a ``react``
        program), as far as its spec, or the cached program, says. Cheap: for the CPU lane's check."""
        if not isinstance(ref, dict):
            return False
        spec = ref.get("spec")
        if isinstance(spec, dict):
            return "tools" in spec
        with self._lock:
            entry = self._entries.get(ref.get("id"))  # type: ignore[arg-type]
        program = entry[1] if entry is not None and entry[0] == ref.get("version") else None
        return bool(getattr(getattr(program, "spec", None), "options", {}).get("tools"))

    def forget(self, program_id: str) -> bool:
        with self._lock:
            return self._entries.pop(program_id, None) is not None

    def clear(self) -> int:
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            return n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {pid: version for pid, (version, _program) in self._entries.items()}


def program_cache(worker: Worker) -> ProgramCache:
    """The worker's program cache (made on first use)."""
    cache = worker.state.get("programs")
    if cache is None:
        cache = worker.state["programs"] = ProgramCache()
    return cache
