"""The shape of the code (issue 8, STYLE.md "A sketch of the house"): every import arrow
points down, and nothing inside gateway/ goes round in a circle.

    fedgate/             the front door: composes the two sides
    gateway/  emitter/   the server and the client: never import each other
    audit/ keyring/ schemas/ common/   what both stand on: import neither side

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from …
import`` anywhere in a module counts — at the top, inside a function (lazy imports), and
under ``if TYPE_CHECKING:`` alike.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedgate", "gateway", "emitter", "audit", "keyring", "schemas", "common")
# package -> the first-party packages it must never import
FORBIDDEN = {
    "gateway": {"emitter", "fedgate"},
    "emitter": {"gateway", "fedgate"},
    **{base: {"gateway", "emitter", "fedgate"} for base in ("audit", "keyring", "schemas",
                                                               "common")},
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every first-party package."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def imported_names(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(absolute dotted name, line) of everything ``name`` imports; ``from X import y``
    yields ``X.y`` (a submodule or a member: :func:`resolve` tells which)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield f"{module}.{alias.name}", node.lineno


def resolve(dotted: str) -> str | None:
    """The first-party module an imported name lives in (the longest known prefix)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for dotted, _ in imported_names(name, path):
            target = resolve(dotted)
            if target is not None and target != name:
                edges[name].add(target)
    return edges


def test_the_walk_sees_the_packages():
    assert {"fedgate.cli", "gateway.pipeline.pipeline", "emitter.client", "common.tls",
            "schemas.routes"} <= set(MODULES)
    assert "gateway.pipeline.records" in graph()["gateway.http.app"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    wrong = []
    for name, path in MODULES.items():
        if name.split(".")[0] != package:
            continue
        for dotted, line in imported_names(name, path):
            top = dotted.split(".")[0]
            if top in FORBIDDEN[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {dotted}")
    assert not wrong, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(
        wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_between_modules(package):
    """Lazy and TYPE_CHECKING-only imports included: a cycle is a cycle to a reader."""
    edges = {name: {t for t in targets if t.split(".")[0] == package}
             for name, targets in graph().items() if name.split(".")[0] == package}
    assert not cycles(edges), f"import cycles in {package}/: {cycles(edges)}"
