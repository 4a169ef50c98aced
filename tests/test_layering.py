"""The floors of the project, checked on every import statement (module level, inside functions and
under TYPE_CHECKING alike: a lazy or type-only import still ties two modules together).

    trees/     the ground: imports nothing of ours
    export/    stands on trees/
    train/     stands on export/ and trees/
    runtime/   the core a request passes through: stands on export/ and trees/
    tools/     measurement, search, benchmarks, peers and the command line: may import everything;
               nothing outside tools/ imports it

and no two modules import each other, directly or around a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {                       # package -> the packages of ours it may import (itself included)
    "trees": {"trees"},
    "export": {"trees", "export"},
    "train": {"trees", "export", "train"},
    "runtime": {"trees", "export", "runtime"},
    "tools": {"trees", "export", "train", "runtime", "tools"},
}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module of our packages."""
    modules = {}
    for package in FLOORS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ours `path` imports, wherever the import statement stands. `from a.b import c`
    names module a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def test_every_package_imports_only_its_floor_and_below():
    wrong = [f"{module} imports {target}"
             for module, targets in import_graph().items() for target in sorted(targets)
             if target.split(".")[0] not in FLOORS[module.split(".")[0]]]
    assert not wrong, "imports that point up a floor:\n  " + "\n  ".join(wrong)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "modules that import each other (around a circle):\n  " + "\n  ".join(map(str, found))


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"b"}}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert sorted(circles(graph)) == expected


def test_nothing_below_the_tools_floor_imports_it():
    users = sorted(module for module, targets in import_graph().items()
                   if not module.startswith("tools") and any(t.startswith("tools") for t in targets))
    assert not users, f"modules below tools/ that import it: {users}"


def test_no_module_is_written_as_a_string_for_importlib():
    """Builders are looked up in dicts of functions, not named as "module:function" strings."""
    offenders = [str(path.relative_to(ROOT)) for path in module_files().values()
                 if "importlib.import_module" in path.read_text()]
    assert not offenders, f"modules importing by name: {offenders}"
