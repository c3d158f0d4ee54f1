"""``docs/architecture.md`` stays true: every module, function and attribute it names exists, its module
map lists every module of ``dspex_trio``, its public-surface tables are the real ones, and
``bridge_child`` never imports ``dspex_trio``.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import types

import attrs
import pytest

import dspex_trio

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("dspex_trio", "bridge_child")
EXTERNAL = frozenset({"dspy", "nursery", "os", "trio", "trio_websocket", "CancelScope", "ThreadPoolExecutor"})
"""First parts of dotted names the page uses that are not ours (checked elsewhere, or not at all)."""
DOTTED = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)`")


@attrs.define
class Module:
    """What a module of ours defines, read from its source (importing the worker's modules would import
    dspy): its top-level names, the source of each name it imports, and each class's members."""

    names: set[str] = attrs.Factory(set)
    imported: dict[str, str] = attrs.Factory(dict)
    """name -> the module it comes from."""
    classes: dict[str, tuple[set[str], list[str]]] = attrs.Factory(dict)
    """class name -> (its members: methods, class attributes, fields, ``self.x`` set in its methods;
    the names of its bases)."""


def _targets(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Tuple):
        return [name for element in node.elts for name in _targets(element)]
    return []


def read_module(path: pathlib.Path, package: str) -> Module:
    module = Module()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            source = node.module if node.level == 0 else f"{package}.{node.module}"
            for alias in node.names:
                module.names.add(alias.asname or alias.name)
                module.imported[alias.asname or alias.name] = source
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            module.names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            module.names.add(node.name)
            members: set[str] = set()
            for item in ast.walk(node):
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign | ast.Assign):
                    for target in item.targets if isinstance(item, ast.Assign) else [item.target]:
                        members.update(_targets(target))
                        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                            members.add(target.attr)  # self.x = ...
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            module.classes[node.name] = (members, bases)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                module.names.update(_targets(target))
    return module


def our_modules() -> dict[str, Module]:
    """Every module of both packages, by dotted name (``dspex_trio._pool``, ``bridge_child.wire``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = read_module(path, name if parts[-1] == "__init__" else name.rsplit(".", 1)[0])
    return modules


def has_member(modules: dict[str, Module], cls: str, member: str) -> bool:
    """Whether a class of ours named ``cls`` (or one of its bases) defines ``member``."""
    for module in modules.values():
        if cls in module.classes:
            members, bases = module.classes[cls]
            if member in members or any(has_member(modules, base, member) for base in bases if base != cls):
                return True
    return False


def resolve(dotted: str, modules: dict[str, Module]) -> bool:
    """Whether ``dotted`` names something of ours: ``package.module.name[.member]``, ``module.name
    [.member]`` by a module's short name (``_pool``, ``wire``), or ``Class.member``."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest module path first
        prefix = ".".join(parts[:cut])
        found = [name for name in modules if name == prefix or name.endswith("." + prefix)]
        if found and cut == len(parts):
            return True  # a module
        if found:
            name, rest = parts[cut], parts[cut + 1 :]
            for module_name in found:
                module = modules[module_name]
                if name not in module.names:
                    continue
                owner = module.imported.get(name, module_name)
                if not rest or has_member({owner: modules.get(owner, module)}, name, rest[0]):
                    return True
            return False
    return len(parts) == 2 and has_member(modules, parts[0], parts[1])


def test_every_dotted_name_on_the_page_exists() -> None:
    modules = our_modules()
    text = DOC.read_text()
    names = sorted({m.group(1) for m in DOTTED.finditer(text)})
    assert len(names) > 50  # the path of an execution names its hops
    ours = [
        name for name in names if name.split(".")[0] not in EXTERNAL and not name.endswith((".py", ".md"))
    ]
    missing = [name for name in ours if not resolve(name, modules)]
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n{title}\n")
    end = text.find("\n#", start + len(title) + 2)
    return text[start : end if end != -1 else len(text)]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # the header


def test_the_module_map_lists_every_module_of_the_runtime_and_what_each_holds() -> None:
    modules = our_modules()
    listed: set[str] = set()
    for row in table_rows(section("## Where each concept lives")):
        names = set(re.findall(r"`([\w/]+)`", row[0]))
        listed |= names
        # the row's code names (``CamelCase`` or ``snake_case``) are names of its module
        held = {
            token
            for token in re.findall(r"`([A-Za-z_]\w*)`", row[1])
            if "_" in token.strip("_") or token[0].isupper()
        }
        if names == {"testing/"}:
            held -= {path.stem for path in (ROOT / "dspex_trio" / "testing").glob("*.py")}  # its modules
        defined = set().union(
            *(modules[f"dspex_trio.{n}"].names for n in names if f"dspex_trio.{n}" in modules)
        )
        assert held <= defined, f"{row[0]}: {sorted(held - defined)} not in the module"
    on_disk = {path.stem for path in (ROOT / "dspex_trio").glob("*.py")} | {"testing/"}
    assert listed == on_disk


def test_the_public_surface_tables_are_the_real_one() -> None:
    exported = {row[0].strip("`") for row in table_rows(section("### Exported"))}
    public = {
        name
        for name, value in vars(dspex_trio).items()
        if name.isidentifier() and not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == public
    for name, where, why in table_rows(section("### Not exported")):
        name, where = name.strip("`"), where.strip("`")
        assert not hasattr(dspex_trio, name), f"{name} is exported"
        assert hasattr(importlib.import_module(where), name), f"{name} is not in {where}"
        assert why


@pytest.mark.parametrize("path", sorted((ROOT / "bridge_child").rglob("*.py")), ids=lambda p: p.name)
def test_bridge_child_never_imports_dspex_trio(path: pathlib.Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] != "dspex_trio", f"{path.name}: {node.module}"
        elif isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] != "dspex_trio" for alias in node.names), path.name
