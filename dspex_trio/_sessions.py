"""Sessions owned by the host: program specs and LM configuration, with an idle TTL.

Workers only cache what the store holds: any worker can serve any session, and a worker's death loses
nothing. The store is plain synchronous state (one Trio thread owns it); its clock is injectable so the
TTL is tested without waiting.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from typing import Any, Final

import attrs

from dspex_trio._errors import ProgramNotFound

DEFAULT_SESSION = "default"
"""The session used when a call names none."""
DEFAULT_SESSION_TTL_S: Final = 3600.0
"""A session unused for this many seconds is dropped (with its programs and LM configuration)."""
MAX_SESSIONS: Final = 10_000
"""Sessions held at once; creating one more drops the least recently used."""
MAX_PROGRAMS_PER_SESSION: Final = 1_000


@attrs.frozen
class ProgramSpec:
    """What a worker needs to materialise a program: plain data, never code."""

    id: str
    version: int
    """Bumped whenever the program's definition or state changes; workers cache by (id, version)."""
    spec: dict[str, Any]
    """The definition (signature, module kind, instructions, state), as sent to workers."""
    created_at: float

    def wire_ref(self, *, with_spec: bool) -> dict[str, Any]:
        ref: dict[str, Any] = {"id": self.id, "version": self.version}
        if with_spec:
            ref["spec"] = self.spec
        return ref


@attrs.define(eq=False)
class Session:
    id: str
    last_used: float
    programs: dict[str, ProgramSpec] = attrs.Factory(dict)
    lm: dict[str, Any] | None = None
    """This session's LM configuration (overrides the pool's), or None."""
    lm_version: int = 0


@attrs.define(eq=False)
class SessionStore:
    """Every session's programs and LM configuration."""

    clock: Callable[[], float]
    """Seconds, monotonic (``trio.current_time`` in the pool; a fake in tests)."""
    ttl: float = DEFAULT_SESSION_TTL_S
    max_sessions: int = MAX_SESSIONS
    _sessions: dict[str, Session] = attrs.Factory(dict)
    _versions: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self._sessions)

    def session(self, session_id: str | None) -> Session:
        """The session (created on first use), marked as used now."""
        sid = session_id or DEFAULT_SESSION
        now = self.clock()
        session = self._sessions.get(sid)
        if session is None:
            self.expire()
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions.values(), key=lambda s: s.last_used)
                del self._sessions[oldest.id]
            session = self._sessions[sid] = Session(sid, now)
        session.last_used = now
        return session

    def peek(self, session_id: str | None) -> Session | None:
        """The session if it exists, without touching it."""
        return self._sessions.get(session_id or DEFAULT_SESSION)

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than the TTL; returns their ids."""
        cutoff = self.clock() - self.ttl
        gone = [sid for sid, s in self._sessions.items() if s.last_used < cutoff]
        for sid in gone:
            del self._sessions[sid]
        return gone

    def end(self, session_id: str) -> bool:
        """Drop a session now; True if it existed."""
        return self._sessions.pop(session_id, None) is not None

    def add_program(
        self, session_id: str | None, spec: dict[str, Any], *, program_id: str | None = None
    ) -> ProgramSpec:
        session = self.session(session_id)
        if program_id is None:
            program_id = f"p_{secrets.token_hex(6)}"
        if program_id not in session.programs and len(session.programs) >= MAX_PROGRAMS_PER_SESSION:
            raise ValueError(f"session {session.id!r} already holds {MAX_PROGRAMS_PER_SESSION} programs")
        program = ProgramSpec(program_id, next(self._versions), dict(spec), self.clock())
        session.programs[program_id] = program
        return program

    def update_program(self, session_id: str | None, program_id: str, **changes: Any) -> ProgramSpec:
        """Replace fields of a program's spec (e.g. its state); bumps its version."""
        old = self.program(session_id, program_id)
        new = ProgramSpec(old.id, next(self._versions), {**old.spec, **changes}, old.created_at)
        self.session(session_id).programs[program_id] = new
        return new

    def program(self, session_id: str | None, program_id: str) -> ProgramSpec:
        session = self.session(session_id)
        try:
            return session.programs[program_id]
        except KeyError:
            raise ProgramNotFound(f"no program {program_id!r} in session {session.id!r}") from None

    def programs(self, session_id: str | None) -> list[ProgramSpec]:
        return list(self.session(session_id).programs.values())

    def delete_program(self, session_id: str | None, program_id: str) -> None:
        session = self.session(session_id)
        if session.programs.pop(program_id, None) is None:
            raise ProgramNotFound(f"no program {program_id!r} in session {session.id!r}")

    def set_lm(self, session_id: str | None, lm: dict[str, Any] | None) -> int:
        session = self.session(session_id)
        session.lm = lm
        session.lm_version = next(self._versions)
        return session.lm_version
