"""Sessions owned by the host: program specs and LM configuration, with an idle TTL.

Workers only cache what the store holds: any worker can serve any session, and a worker's death loses
nothing. The store is plain synchronous state (one Trio thread owns it); its clock is injectable so the
TTL is tested without waiting.

Two kinds of session live here:

- **named** sessions (the Python API): any string not starting with ``s_`` names one; it is created by
  the first call that writes to it (a program, an LM); at ``max_sessions`` the least recently used named
  session is dropped.
- **minted** sessions (the websocket API): :meth:`SessionStore.open` creates one under an unguessable id
  (128 random bits): the id is the capability, only its holder can reach the session. At
  ``max_minted`` opening one more is refused (``LimitExceeded``): a flood of opens never pushes another
  client's session out. An id with the ``s_`` prefix names only a minted session: unknown, it is
  ``SessionNotFound`` (on reads and writes alike), never a new session.

Reads never create a session. Every session's program specs are bounded in count and bytes, and all
specs together by ``max_total_bytes``; at a bound the write is refused with ``LimitExceeded`` and
nothing changes.
"""

from __future__ import annotations

import collections
import itertools
import secrets
from collections.abc import Callable
from typing import Any, Final

import attrs
import msgspec

from dspex_trio._errors import InvalidParams, LimitExceeded, ProgramNotFound, SessionNotFound

DEFAULT_SESSION = "default"
"""The session used when a call names none."""
DEFAULT_SESSION_TTL_S: Final = 3600.0
"""A session unused for this many seconds is dropped (with its programs and LM configuration)."""
MAX_SESSIONS: Final = 10_000
"""Named sessions held at once; creating one more drops the least recently used named session."""
MAX_MINTED_SESSIONS: Final = 10_000
"""Minted (websocket) sessions held at once; opening one more is refused (``LimitExceeded``)."""
MAX_PROGRAMS_PER_SESSION: Final = 1_000
"""Programs one session holds (unless the session was opened with a lower bound)."""
MAX_TOTAL_SPEC_BYTES: Final = 1024 * 1024 * 1024
"""Bytes of program specs (JSON-encoded: signature, instructions, state) held by all sessions together."""
MAX_SESSION_ID_CHARS: Final = 128
"""Longest session name the store accepts, in characters."""
MINTED_ID_BYTES: Final = 16
"""Random bytes in a minted session id (128 bits, URL-safe base64 after the ``s_`` prefix)."""
MINTED_PREFIX: Final = "s_"


def spec_bytes(spec: dict[str, Any]) -> int:
    """The size a program spec counts for against the byte bounds: its JSON encoding."""
    return len(msgspec.json.encode(spec))


def public_session_id(session_id: str) -> str:
    """A session id as it may appear in a log line: a minted id is a capability, so only its prefix."""
    if session_id.startswith(MINTED_PREFIX) and len(session_id) > 10:
        return session_id[:8] + "…"
    return session_id


@attrs.frozen
class ProgramSpec:
    """What a worker needs to materialise a program: plain data, never code."""

    id: str
    version: int
    """Bumped whenever the program's definition or state changes; workers cache by (id, version)."""
    spec: dict[str, Any]
    """The definition (signature, module kind, instructions, state), as sent to workers."""
    created_at: float
    size: int = 0
    """The spec's size in bytes (:func:`spec_bytes`), as counted against the session's bounds."""

    def wire_ref(self, *, with_spec: bool) -> dict[str, Any]:
        ref: dict[str, Any] = {"id": self.id, "version": self.version}
        if with_spec:
            ref["spec"] = self.spec
        return ref


@attrs.define(eq=False)
class Session:
    id: str = attrs.field(repr=public_session_id)
    last_used: float
    programs: dict[str, ProgramSpec] = attrs.Factory(dict)
    lm: dict[str, Any] | None = attrs.field(default=None, repr=False)
    """This session's LM configuration (overrides the backend's), or None. May hold a key: never shown."""
    lm_version: int = 0
    minted: bool = False
    """Opened by :meth:`SessionStore.open` under a server-minted id (the websocket's sessions)."""
    max_programs: int = MAX_PROGRAMS_PER_SESSION
    max_bytes: int | None = None
    """Bytes of program specs this session may hold (None: only the store's total bound)."""
    bytes: int = 0
    """Bytes of program specs it holds now."""
    lm_cache: str | None = None
    """This session's LM cache mode (``read_write``, ``read_only``, ``off``), or None: the backend's."""


@attrs.define(eq=False)
class SessionStore:
    """Every session's programs and LM configuration."""

    clock: Callable[[], float]
    """Seconds, monotonic (``trio.current_time`` in the pool; a fake in tests)."""
    ttl: float = DEFAULT_SESSION_TTL_S
    max_sessions: int = MAX_SESSIONS
    max_minted: int = MAX_MINTED_SESSIONS
    max_total_bytes: int = MAX_TOTAL_SPEC_BYTES
    # Each kind in least-recently-used order (a use moves a session to the end), so expiry and eviction
    # look only at the front.
    _named: collections.OrderedDict[str, Session] = attrs.Factory(collections.OrderedDict)
    _minted: collections.OrderedDict[str, Session] = attrs.Factory(collections.OrderedDict)
    _total_bytes: int = 0
    _versions: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self._named) + len(self._minted)

    @property
    def total_bytes(self) -> int:
        """Bytes of program specs held by all sessions."""
        return self._total_bytes

    def _kind(self, session_id: str) -> collections.OrderedDict[str, Session]:
        return self._minted if session_id.startswith(MINTED_PREFIX) else self._named

    def _touch(self, session: Session) -> Session:
        session.last_used = self.clock()
        (self._minted if session.minted else self._named).move_to_end(session.id)
        return session

    # -- sessions -------------------------------------------------------------------------------------
    def session(self, session_id: str | None) -> Session:
        """The session (a named one is created on first use), marked as used now. For writes.

        Raises:
            SessionNotFound: ``session_id`` has the minted prefix and no such minted session exists.
            InvalidParams: a name too long to be a session's.
        """
        sid = session_id or DEFAULT_SESSION
        if sid.startswith(MINTED_PREFIX):
            return self.minted(sid)
        session = self._named.get(sid)
        if session is not None:
            return self._touch(session)
        if len(sid) > MAX_SESSION_ID_CHARS:
            raise InvalidParams(f"a session name has at most {MAX_SESSION_ID_CHARS} characters")
        self.expire()
        while len(self._named) >= self.max_sessions:
            _, oldest = self._named.popitem(last=False)
            self._drop(oldest)
        session = self._named[sid] = Session(sid, self.clock())
        return session

    def open(self, *, max_programs: int | None = None, max_bytes: int | None = None) -> Session:
        """A new session under a server-minted, unguessable id (its holder's capability).

        Raises:
            LimitExceeded: ``max_minted`` minted sessions exist (after dropping expired ones).
        """
        self.expire()
        if len(self._minted) >= self.max_minted:
            raise LimitExceeded(
                f"the server holds {self.max_minted} sessions, its maximum: end unused ones (session/end)",
                limit="sessions",
                max=self.max_minted,
            )
        sid = MINTED_PREFIX + secrets.token_urlsafe(MINTED_ID_BYTES)
        session = Session(
            sid,
            self.clock(),
            minted=True,
            max_programs=min(max_programs or MAX_PROGRAMS_PER_SESSION, MAX_PROGRAMS_PER_SESSION),
            max_bytes=max_bytes,
        )
        self._minted[sid] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The session if it exists (marked as used now), without creating it. For reads.

        Raises:
            SessionNotFound: ``session_id`` has the minted prefix and no such minted session exists.
        """
        sid = session_id or DEFAULT_SESSION
        if sid.startswith(MINTED_PREFIX):
            return self.minted(sid)
        session = self._named.get(sid)
        if session is None or self._expired(session, self.clock()):
            return None
        return self._touch(session)

    def peek(self, session_id: str | None) -> Session | None:
        """The session if it exists, without touching it."""
        sid = session_id or DEFAULT_SESSION
        return (self._minted if sid.startswith(MINTED_PREFIX) else self._named).get(sid)

    def exists(self, session_id: str) -> bool:
        """Whether the session exists now (not expired)."""
        session = self.peek(session_id)
        return session is not None and not self._expired(session, self.clock())

    def minted(self, session_id: str) -> Session:
        """The minted session with this id, marked as used now.

        Raises:
            SessionNotFound: no minted session has this id (never opened, ended, or expired).
        """
        session = self._minted.get(session_id)
        if session is None or self._expired(session, self.clock()):
            raise SessionNotFound(
                f"no session {public_session_id(session_id)!r} (ended, expired or never opened)"
            )
        return self._touch(session)

    def _expired(self, session: Session, now: float) -> bool:
        return session.last_used < now - self.ttl

    def expire(self) -> list[str]:
        """Drop sessions idle for longer than the TTL; returns their ids."""
        now = self.clock()
        gone: list[str] = []
        for sessions in (self._named, self._minted):
            while sessions:
                oldest = next(iter(sessions.values()))
                if not self._expired(oldest, now):
                    break
                del sessions[oldest.id]
                self._drop(oldest)
                gone.append(oldest.id)
        return gone

    def end(self, session_id: str) -> bool:
        """Drop a session now; True if it existed."""
        session = self._kind(session_id).pop(session_id, None)
        if session is None:
            return False
        self._drop(session)
        return True

    def _drop(self, session: Session) -> None:
        self._total_bytes -= session.bytes
        session.bytes = 0

    # -- programs -------------------------------------------------------------------------------------
    def _check_room(self, session: Session, grow_programs: int, grow_bytes: int) -> None:
        if grow_programs > 0 and len(session.programs) + grow_programs > session.max_programs:
            raise LimitExceeded(
                f"session {public_session_id(session.id)!r} already holds {session.max_programs} programs",
                limit="programs",
                max=session.max_programs,
            )
        if grow_bytes <= 0:
            return
        if session.max_bytes is not None and session.bytes + grow_bytes > session.max_bytes:
            raise LimitExceeded(
                f"session {public_session_id(session.id)!r} would hold more than {session.max_bytes} "
                "bytes of programs",
                limit="session_bytes",
                max=session.max_bytes,
            )
        if self._total_bytes + grow_bytes > self.max_total_bytes:
            raise LimitExceeded(
                f"the server would hold more than {self.max_total_bytes} bytes of programs",
                limit="total_bytes",
                max=self.max_total_bytes,
            )

    def _store(self, session: Session, program: ProgramSpec) -> ProgramSpec:
        old = session.programs.get(program.id)
        grow = program.size - (old.size if old is not None else 0)
        self._check_room(session, 0 if old is not None else 1, grow)
        session.programs[program.id] = program
        session.bytes += grow
        self._total_bytes += grow
        return program

    def add_program(
        self, session_id: str | None, spec: dict[str, Any], *, program_id: str | None = None
    ) -> ProgramSpec:
        """Store a program (a new id unless ``program_id`` names one to replace).

        Raises:
            LimitExceeded: the session's program count or bytes, or the store's bytes, would pass a bound.
        """
        session = self.session(session_id)
        if program_id is None:
            program_id = f"p_{secrets.token_hex(6)}"
        spec = dict(spec)
        program = ProgramSpec(program_id, next(self._versions), spec, self.clock(), spec_bytes(spec))
        return self._store(session, program)

    def update_program(self, session_id: str | None, program_id: str, **changes: Any) -> ProgramSpec:
        """Replace fields of a program's spec (e.g. its state); bumps its version."""
        session = self._holding(session_id, program_id)
        old = session.programs[program_id]
        spec = {**old.spec, **changes}
        new = ProgramSpec(old.id, next(self._versions), spec, old.created_at, spec_bytes(spec))
        return self._store(session, new)

    def _holding(self, session_id: str | None, program_id: str) -> Session:
        session = self.get(session_id)
        if session is None or program_id not in session.programs:
            sid = public_session_id(session_id or DEFAULT_SESSION)
            raise ProgramNotFound(f"no program {program_id!r} in session {sid!r}")
        return session

    def program(self, session_id: str | None, program_id: str) -> ProgramSpec:
        """A program (its session is marked as used). ``ProgramNotFound`` if absent."""
        return self._holding(session_id, program_id).programs[program_id]

    def programs(self, session_id: str | None) -> list[ProgramSpec]:
        """The session's programs (none if there is no such session)."""
        session = self.get(session_id)
        return list(session.programs.values()) if session is not None else []

    def delete_program(self, session_id: str | None, program_id: str) -> None:
        session = self._holding(session_id, program_id)
        program = session.programs.pop(program_id)
        session.bytes -= program.size
        self._total_bytes -= program.size

    def set_lm(self, session_id: str | None, lm: dict[str, Any] | None) -> int:
        session = self.session(session_id)
        session.lm = lm
        session.lm_version = next(self._versions)
        return session.lm_version
