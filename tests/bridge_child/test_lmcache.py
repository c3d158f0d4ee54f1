"""The worker's LM answer cache (``bridge_child._lmcache``), in-process: its key holds no API key but
keeps the base, the per-call modes, the hits counted per execution, the disk cache's cap, and the
restricted unpickling of what is on disk."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from bridge_child import _lmcache


@pytest.fixture
def restore_dspy_cache() -> Iterator[None]:
    import dspy

    before, settings = dspy.cache, dict(_lmcache._settings)
    yield
    with dspy._cache_lock:
        dspy.cache = before
    _lmcache._settings.clear()
    _lmcache._settings.update(settings)


def request(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "openai/fake", "messages": [{"role": "user", "content": question}], **extra}


def directory_bytes(path: pathlib.Path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_off_until_configured_and_entries_zero_keeps_it_off(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(0)
    assert not _lmcache.enabled()
    assert not cache.enable_memory_cache and not cache.enable_disk_cache
    assert _lmcache.with_hits(None, _lmcache._Counter()) is None  # no cache: usage as before


def test_the_key_holds_no_api_key_and_keeps_the_base(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    one = cache.cache_key(request("q", api_key="sk-one", api_base="http://a"), ["api_key", "api_base"])
    assert one == cache.cache_key(request("q", api_key="sk-two", api_base="http://a"))
    assert one != cache.cache_key(request("q", api_key="sk-one", api_base="http://b"))
    assert one != cache.cache_key(request("other", api_key="sk-one", api_base="http://a"))


def test_modes_and_hits_per_execution(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    assert _lmcache.enabled()
    with _lmcache.scope("read_only") as hits:
        cache.put(request("a"), {"answer": 1})
        assert cache.get(request("a")) is None  # read_only never stored it
    with _lmcache.scope(None) as hits:  # the worker's mode: read_write
        cache.put(request("a"), {"answer": 1})
        assert cache.get(request("a")) == {"answer": 1}
        assert cache.get(request("b")) is None
    assert hits.hits == 1
    with _lmcache.scope("off") as hits:
        assert cache.get(request("a")) is None
        cache.put(request("c"), {"answer": 3})
    assert hits.hits == 0
    with _lmcache.scope("read_only") as hits:
        assert cache.get(request("a")) == {"answer": 1}
        assert cache.get(request("c")) is None  # off stored nothing
    assert hits.hits == 1
    usage = _lmcache.with_hits(None, hits)
    assert usage is not None and usage["cache_hits"] == 1 and usage["total_tokens"] == 0
    assert _lmcache.with_hits({"total_tokens": 7}, hits) == {"total_tokens": 7, "cache_hits": 1}
    with pytest.raises(ValueError, match="read_write, read_only, off"), _lmcache.scope("sometimes"):
        pass


def test_memory_is_bounded_per_worker(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(8)
    for i in range(50):
        cache.put(request(f"q{i}"), {"i": i})
    assert len(cache.memory_cache) == 8
    assert cache.get(request("q49")) == {"i": 49}
    assert cache.get(request("q0")) is None


def test_the_disk_cache_never_exceeds_its_cap(restore_dspy_cache: None, tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "lm-cache"
    cap = _lmcache.MIN_DISK_BYTES
    cache = _lmcache.configure(4, str(directory), cap)
    answer = "x" * 20_000
    written = 0
    for i in range(600):  # ~12 MB of answers into a 4 MiB cap
        cache.put(request(f"q{i}", api_key="sk-secret-key-123"), {"answer": answer, "i": i})
        written += len(answer)
        if i % 25 == 0:
            assert directory_bytes(directory) <= cap
    assert written > 2 * cap
    assert directory_bytes(directory) <= cap
    cache.memory_cache.clear()
    assert cache.get(request("q599")) == {"answer": answer, "i": 599}  # from disk
    assert cache.get(request("q0")) is None  # evicted
    for root, _, files in os.walk(directory):
        for name in files:
            assert b"sk-secret-key-123" not in pathlib.Path(root, name).read_bytes()


def test_another_worker_reads_what_one_stored(restore_dspy_cache: None, tmp_path: pathlib.Path) -> None:
    directory = str(tmp_path / "shared")
    first = _lmcache.configure(4, directory, _lmcache.MIN_DISK_BYTES)
    first.put(request("shared"), {"answer": "42"})
    second = _lmcache.configure(4, directory, _lmcache.MIN_DISK_BYTES)  # as a second worker opens it
    with _lmcache.scope(None) as hits:
        assert second.get(request("shared")) == {"answer": "42"}
    assert hits.hits == 1


class Planted:
    def __reduce__(self) -> Any:
        return (os.getpid, ())


def test_a_planted_object_on_disk_is_never_unpickled(
    restore_dspy_cache: None, tmp_path: pathlib.Path
) -> None:
    import diskcache

    directory = tmp_path / "planted"
    cache = _lmcache.configure(4, str(directory), _lmcache.MIN_DISK_BYTES)
    with diskcache.Cache(str(directory)) as raw:
        raw.set(cache.cache_key(request("evil")), Planted())
    assert cache.get(request("evil")) is None


def test_a_disk_cap_below_the_minimum_is_refused(restore_dspy_cache: None, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        _lmcache.configure(4, str(tmp_path), 1024)


class FakeCall:
    """What the cache reads of a worker call: its cancel event and its time left."""

    def __init__(self) -> None:
        import threading

        self.cancelled = threading.Event()

    def remaining(self) -> float | None:
        return None


def run_threads(n: int, target: Any) -> list[Any]:
    import threading

    results: list[Any] = [None] * n

    def run(i: int) -> None:
        results[i] = target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    return results


def test_identical_misses_follow_one_leader(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    with _lmcache.scope(None, FakeCall(), coalesce=True) as leader:  # type: ignore[arg-type]
        assert cache.get(request("same")) is None  # it leads: it sends the request

        def follow(i: int) -> tuple[Any, int]:
            with _lmcache.scope(None, FakeCall(), coalesce=True) as hits:  # type: ignore[arg-type]
                return cache.get(request("same")), hits.hits

        import threading

        followers: list[Any] = []
        runner = threading.Thread(target=lambda: followers.extend(run_threads(20, follow)))
        runner.start()
        cache.put(request("same"), {"answer": "once"})  # the leader's answer
        runner.join(timeout=30)
    assert len(leader.led) == 1
    assert followers == [({"answer": "once"}, 1)] * 20
    assert not _lmcache._flights


def test_a_failed_leader_hands_over_to_one_follower(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    import threading

    leading = threading.Event()
    sent: list[int] = []

    def follow(i: int) -> Any:
        with _lmcache.scope(None, FakeCall(), coalesce=True):  # type: ignore[arg-type]
            answer = cache.get(request("flaky"))
            if answer is None:  # it leads now: its request succeeds
                sent.append(i)
                cache.put(request("flaky"), {"answer": "second try"})
            return answer

    with _lmcache.scope(None, FakeCall(), coalesce=True):  # type: ignore[arg-type]
        assert cache.get(request("flaky")) is None
        leading.set()
        followers: list[Any] = []
        runner = threading.Thread(target=lambda: followers.extend(run_threads(10, follow)))
        runner.start()
        # the first leader's request fails: it stores nothing, and its execution ends (below)
    runner.join(timeout=30)
    assert len(sent) == 1
    assert followers.count(None) == 1 and followers.count({"answer": "second try"}) == 9
    assert not _lmcache._flights


def test_a_cancelled_follower_stops_waiting(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    with _lmcache.scope(None, FakeCall(), coalesce=True):  # type: ignore[arg-type]
        assert cache.get(request("slow")) is None
        call = FakeCall()
        call.cancelled.set()
        with _lmcache.scope(None, call, coalesce=True):  # type: ignore[arg-type]
            assert cache.get(request("slow")) is None  # at once: it does not wait for the leader
    assert not _lmcache._flights


def test_read_only_follows_but_never_leads(restore_dspy_cache: None) -> None:
    cache = _lmcache.configure(16)
    with _lmcache.scope("read_only", FakeCall(), coalesce=True) as hits:  # type: ignore[arg-type]
        assert cache.get(request("ro")) is None  # nobody leads: it sends, and stores nothing
        assert not hits.led and not _lmcache._flights
