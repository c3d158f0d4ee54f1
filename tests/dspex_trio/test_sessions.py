"""The host-owned session store, on its own: a fake clock makes the idle TTL exact and instant."""

from __future__ import annotations

import pytest

import dspex_trio
from dspex_trio._errors import ProgramNotFound
from dspex_trio._sessions import DEFAULT_SESSION, MAX_PROGRAMS_PER_SESSION, ProgramSpec, SessionStore


class FakeClock:
    """A settable clock: ``clock()`` returns ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> SessionStore:
    return SessionStore(clock=clock, ttl=10.0, max_sessions=3)


def test_program_not_found_is_public_and_typed() -> None:
    assert dspex_trio.ProgramNotFound is ProgramNotFound
    assert issubclass(ProgramNotFound, dspex_trio.DspexError)
    assert issubclass(ProgramNotFound, KeyError)
    # KeyError would render repr(message) with quotes: the message must read as written.
    assert str(ProgramNotFound("no program 'x'")) == "no program 'x'"


def test_a_session_is_created_on_first_use_and_none_means_the_default(
    store: SessionStore, clock: FakeClock
) -> None:
    assert len(store) == 0
    assert store.peek("s1") is None
    s1 = store.session("s1")
    assert s1.id == "s1" and s1.last_used == clock.now
    assert store.session("s1") is s1
    default = store.session(None)
    assert default.id == DEFAULT_SESSION
    assert store.peek(None) is default
    assert len(store) == 2


def test_add_program_returns_a_spec_with_an_id_and_a_version(store: SessionStore, clock: FakeClock) -> None:
    spec = {"signature": "question -> answer", "module": "predict"}
    program = store.add_program("s1", spec)
    assert isinstance(program, ProgramSpec)
    assert program.id.startswith("p_") and len(program.id) > 4
    assert program.spec == spec
    assert program.created_at == clock.now
    assert store.program("s1", program.id) is program
    assert store.programs("s1") == [program]
    other = store.add_program("s1", spec)
    assert other.id != program.id
    assert other.version != program.version


def test_the_stored_spec_is_a_copy(store: SessionStore) -> None:
    spec = {"signature": "a -> b"}
    program = store.add_program("s1", spec)
    spec["signature"] = "changed -> by caller"
    spec["extra"] = 1
    assert store.program("s1", program.id).spec == {"signature": "a -> b"}


def test_wire_ref_carries_the_spec_only_when_asked(store: SessionStore) -> None:
    program = store.add_program("s1", {"signature": "a -> b"})
    assert program.wire_ref(with_spec=False) == {"id": program.id, "version": program.version}
    assert program.wire_ref(with_spec=True) == {
        "id": program.id,
        "version": program.version,
        "spec": {"signature": "a -> b"},
    }


def test_sessions_are_isolated(store: SessionStore) -> None:
    program = store.add_program("A", {"signature": "a -> b"})
    with pytest.raises(ProgramNotFound, match=r"no program 'p_\w+' in session 'B'"):
        store.program("B", program.id)
    assert store.programs("B") == []
    # The same explicit id in two sessions names two different programs.
    in_a = store.add_program("A", {"who": "A"}, program_id="shared")
    in_b = store.add_program("B", {"who": "B"}, program_id="shared")
    assert store.program("A", "shared").spec == {"who": "A"}
    assert store.program("B", "shared").spec == {"who": "B"}
    assert in_a.version != in_b.version  # workers cache by (id, version): they never mix them up


def test_update_bumps_the_version_and_merges_the_spec(store: SessionStore, clock: FakeClock) -> None:
    created_at = clock.now
    v1 = store.add_program("s1", {"signature": "a -> b", "demos": []})
    clock.now += 5
    v2 = store.update_program("s1", v1.id, demos=[{"a": 1, "b": 2}])
    assert v2.id == v1.id
    assert v2.version > v1.version
    assert v2.spec == {"signature": "a -> b", "demos": [{"a": 1, "b": 2}]}
    assert v2.created_at == created_at
    assert v1.spec == {"signature": "a -> b", "demos": []}  # the old snapshot is untouched (frozen)
    assert store.program("s1", v1.id) is v2
    v3 = store.update_program("s1", v1.id, instructions="be brief")
    assert v3.version > v2.version
    assert v3.spec["demos"] == [{"a": 1, "b": 2}] and v3.spec["instructions"] == "be brief"
    assert store.programs("s1") == [v3]


def test_re_adding_an_id_replaces_the_program_with_a_new_version(store: SessionStore) -> None:
    first = store.add_program("s1", {"n": 1}, program_id="p")
    second = store.add_program("s1", {"n": 2}, program_id="p")
    assert second.version > first.version
    assert store.program("s1", "p").spec == {"n": 2}
    assert len(store.programs("s1")) == 1


def test_update_of_a_missing_program_raises(store: SessionStore) -> None:
    with pytest.raises(ProgramNotFound):
        store.update_program("s1", "p_missing", demos=[])


def test_delete(store: SessionStore) -> None:
    keep = store.add_program("s1", {"n": 1})
    gone = store.add_program("s1", {"n": 2})
    store.delete_program("s1", gone.id)
    with pytest.raises(ProgramNotFound):
        store.program("s1", gone.id)
    with pytest.raises(ProgramNotFound):
        store.delete_program("s1", gone.id)
    with pytest.raises(ProgramNotFound):
        store.delete_program("other", keep.id)  # only in its own session
    assert store.programs("s1") == [keep]


def test_ttl_expiry_is_exact(store: SessionStore, clock: FakeClock) -> None:
    program = store.add_program("s1", {"n": 1})
    start = clock.now
    clock.now = start + 10.0  # idle for exactly the TTL: still alive
    assert store.expire() == []
    assert store.peek("s1") is not None
    clock.now = start + 10.001
    assert store.expire() == ["s1"]
    assert store.peek("s1") is None
    assert len(store) == 0
    with pytest.raises(ProgramNotFound):  # the program went with its session
        store.program("s1", program.id)


def test_use_refreshes_the_ttl(store: SessionStore, clock: FakeClock) -> None:
    program = store.add_program("s1", {"n": 1})
    store.session("s2")
    clock.now += 8
    assert store.program("s1", program.id) is program  # a lookup is a use
    clock.now += 8  # s1 idle 8 s, s2 idle 16 s
    assert store.expire() == ["s2"]
    assert store.program("s1", program.id) is program
    # peek does not touch: s1 last used at +16, so at +26.5 it has been idle 10.5 s
    clock.now += 10.5
    assert store.peek("s1") is not None
    assert store.expire() == ["s1"]


def test_creating_a_session_sweeps_expired_ones(store: SessionStore, clock: FakeClock) -> None:
    store.session("old")
    clock.now += 11
    store.session("new")
    assert store.peek("old") is None
    assert len(store) == 1


def test_lru_eviction_at_max_sessions(store: SessionStore, clock: FakeClock) -> None:
    for i, sid in enumerate(["s1", "s2", "s3"]):
        clock.now = 1000.0 + i
        store.add_program(sid, {"sid": sid})
    clock.now = 1003.0
    store.programs("s1")  # s1 is now the most recently used; s2 the least
    clock.now = 1004.0
    store.session("s4")
    assert len(store) == 3
    assert store.peek("s2") is None
    assert {sid for sid in ("s1", "s3", "s4") if store.peek(sid) is not None} == {"s1", "s3", "s4"}
    clock.now = 1005.0
    store.session("s5")  # next: s3 (used at 1002)
    assert store.peek("s3") is None
    assert len(store) == 3
    store.session("s1")  # existing sessions never evict
    assert len(store) == 3


def test_end(store: SessionStore) -> None:
    program = store.add_program("s1", {"n": 1})
    assert store.end("s1") is True
    assert store.end("s1") is False
    with pytest.raises(ProgramNotFound):
        store.program("s1", program.id)


def test_program_limit_per_session(clock: FakeClock) -> None:
    store = SessionStore(clock=clock)
    for i in range(MAX_PROGRAMS_PER_SESSION):
        store.add_program("s1", {"i": i}, program_id=f"p{i}")
    with pytest.raises(ValueError, match="already holds"):
        store.add_program("s1", {"i": "one too many"})
    # replacing an existing program is not growth
    replaced = store.add_program("s1", {"i": "again"}, program_id="p0")
    assert store.program("s1", "p0") is replaced
    store.add_program("s2", {"i": 0})  # the limit is per session


def test_set_lm_bumps_the_lm_version(store: SessionStore) -> None:
    v1 = store.set_lm("s1", {"model": "openai/a"})
    v2 = store.set_lm("s1", {"model": "openai/b"})
    assert v2 > v1
    session = store.peek("s1")
    assert session is not None
    assert session.lm == {"model": "openai/b"} and session.lm_version == v2
    store.set_lm("s1", None)
    assert session.lm is None
