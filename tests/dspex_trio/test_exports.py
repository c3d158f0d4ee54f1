"""The public surface (as trio's ``test_exports.py``): ``dspex_trio/__init__.py`` re-exports each public
name once, explicitly (``from ._x import Name as Name``); each reads ``dspex_trio.<name>`` in reprs and
tracebacks; nothing private leaks; classes users only receive cannot be built by hand.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import pathlib
import pickle
import traceback
import types

import attrs
import cattrs
import pytest
import trio

import dspex_trio

INIT = pathlib.Path(dspex_trio.__file__)
START_TIMEOUT_S = 120.0
"""Bound on starting (and stopping) a pool of one real worker on a busy machine."""


def reexports() -> list[tuple[str, str]]:
    """Each ``from <module> import <name> as <name>`` of ``__init__.py``: (module, name), in order."""
    found = []
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert node.module is not None
                found.append((node.module, alias.asname or alias.name))
                if not (alias.asname or alias.name).startswith("_"):
                    assert alias.asname == alias.name, f"{alias.name}: re-export as `X as X` (explicit)"
    return found


def public_names() -> set[str]:
    """Public names of the namespace (pytest's assertion rewriting adds ``@py_builtins``-like ones, which
    no code can name)."""
    return {name for name in vars(dspex_trio) if name.isidentifier() and not name.startswith("_")}


def public_objects() -> dict[str, object]:
    return {
        name: getattr(dspex_trio, name)
        for name in public_names()
        if not isinstance(getattr(dspex_trio, name), types.ModuleType)
    }


def test_every_public_name_is_reexported_once_from_a_private_module() -> None:
    exported = [(module, name) for module, name in reexports() if not name.startswith("_")]
    names = [name for _, name in exported]
    assert len(names) == len(set(names)), "a name is re-exported twice"
    for module, name in exported:
        assert module.startswith("dspex_trio._"), f"{name} comes from {module}, not a private module"
    assert set(names) == set(public_objects())


def test_nothing_private_or_stray_leaks() -> None:
    """The namespace holds the re-exports, ``__version__``, and the public subpackage ``testing``; no
    helper, no stray import, no private module under a public name."""
    modules = {name for name in public_names() if isinstance(getattr(dspex_trio, name), types.ModuleType)}
    assert modules <= {"testing"}
    assert public_names() - modules == {name for _, name in reexports() if not name.startswith("_")}
    for name, value in public_objects().items():
        assert not getattr(value, "__name__", name).startswith("_"), name


def test_no_object_is_exported_under_two_names() -> None:
    seen: dict[int, str] = {}
    for name, value in public_objects().items():
        assert id(value) not in seen, f"{name} is {seen[id(value)]} again"
        seen[id(value)] = name


@pytest.mark.parametrize("name", sorted(public_objects()))
def test_every_public_object_reads_as_dspex_trio(name: str) -> None:
    value = getattr(dspex_trio, name)
    assert value.__module__ == "dspex_trio"
    assert value.__name__ == name
    assert value.__qualname__ == name
    if isinstance(value, type):  # and its own methods
        for attr, member in vars(value).items():
            if inspect.isfunction(member) and not attr.startswith("_"):
                assert member.__module__ == "dspex_trio", f"{name}.{attr}"
                assert member.__qualname__ == f"{name}.{attr}"


def test_a_traceback_names_the_public_error() -> None:
    try:
        raise dspex_trio.PoolUnavailable("the circuit is open", reason="restart budget spent")
    except dspex_trio.PoolUnavailable as exc:
        text = "".join(traceback.format_exception_only(exc))
    assert text.startswith("dspex_trio.PoolUnavailable: the circuit is open")
    assert repr(dspex_trio.WorkerState.READY) == "<WorkerState.READY: 'ready'>"
    assert "dspex_trio.Pool'" in repr(dspex_trio.Pool)


def test_public_records_still_pickle_and_structure() -> None:
    """With ``__module__`` moved, pickle finds the classes by their public name, and cattrs still sees
    the field types the modules wrote (they were resolved before the move)."""
    options = dspex_trio.PoolOptions(workers=3)
    assert pickle.loads(pickle.dumps(options)) == options
    assert pickle.loads(pickle.dumps(dspex_trio.CircuitState.OPEN)) is dspex_trio.CircuitState.OPEN
    converter = cattrs.Converter(forbid_extra_keys=True)
    assert converter.structure({"workers": 3, "max_queue": 8}, dspex_trio.PoolOptions).max_queue == 8
    ws = converter.structure({"allowed_origins": ["https://a.example"]}, dspex_trio.WebsocketOptions)
    assert ws.allowed_origins == ("https://a.example",)
    assert attrs.fields(dspex_trio.WorkerOptions).worker_env.type == tuple[str, ...]


@pytest.mark.parametrize("cls", [dspex_trio.Pool, dspex_trio.Worker, dspex_trio.RemoteBackend])
def test_what_users_only_receive_has_no_public_constructor(cls: type) -> None:
    with pytest.raises(TypeError, match=rf"^dspex_trio\.{cls.__name__} has no public constructor$"):
        cls()


def test_the_version_is_the_package_version() -> None:
    assert dspex_trio.__version__ == importlib.metadata.version("dspex-trio")


@pytest.mark.parametrize(
    ("opener", "record", "fields"),
    [
        ("open_pool", "PoolOptions", {"workers": 1}),
        ("open_pool", "WorkerOptions", {"capacity": 2}),
        ("open_worker", "WorkerOptions", {"capacity": 2}),
    ],
)
async def test_an_option_record_is_taken_as_an_object_or_as_fields_not_both(
    opener: str, record: str, fields: dict[str, int]
) -> None:
    keyword = "worker_options" if (opener, record) == ("open_pool", "WorkerOptions") else "options"
    options = getattr(dspex_trio, record)(**fields)
    with pytest.raises(TypeError, match="not both"):
        async with getattr(dspex_trio, opener)(**{keyword: options}, **fields):
            pytest.fail("opened")  # pragma: no cover
    with pytest.raises(TypeError, match=f"options must be a {record}"):
        async with getattr(dspex_trio, opener)(**{keyword: dict(fields)}):
            pytest.fail("opened")  # pragma: no cover


async def test_serve_websocket_takes_its_options_the_same_way() -> None:
    async with dspex_trio.open_backend("mock") as mock:
        with pytest.raises(TypeError, match="not both"):
            await dspex_trio.serve_websocket(
                mock, port=0, options=dspex_trio.WebsocketOptions(), max_connections=3
            )
        with pytest.raises(TypeError, match=r"unknown WebsocketOptions field\(s\) max_conections"):
            await dspex_trio.serve_websocket(mock, port=0, max_conections=3)


async def test_an_unknown_option_keyword_names_the_known_ones() -> None:
    with pytest.raises(TypeError, match=r"unknown pool option\(s\) wrokers; known: .*workers"):
        async with dspex_trio.open_pool(wrokers=2):
            pytest.fail("opened")  # pragma: no cover
    with pytest.raises(TypeError, match=r"unknown WorkerOptions field\(s\) capacty; known: .*capacity"):
        async with dspex_trio.open_worker(capacty=2):
            pytest.fail("opened")  # pragma: no cover


async def test_typed_options_reach_the_pool_and_its_workers() -> None:
    options = dspex_trio.PoolOptions(workers=1, max_queue=7)
    worker_options = dspex_trio.WorkerOptions(capacity=3)
    with trio.fail_after(START_TIMEOUT_S):
        async with dspex_trio.open_pool(options=options, worker_options=worker_options) as pool:
            assert pool.options is options and pool.worker_options is worker_options
            assert [w.capacity for w in pool.statistics().workers] == [3]  # the worker's own hello
        async with dspex_trio.open_worker(options=dspex_trio.WorkerOptions(capacity=2)) as worker:
            assert worker.options.capacity == 2 and worker.statistics().capacity == 2
