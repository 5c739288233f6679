"""The import direction of src/peftlite, read from the source (ast): no upward import, no cycle, no root import.

The levels, bottom to top (docs/design.md):

    0  functional, kernels, _version
    1  layers
    2  selection, state
    3  merging, wrapping, switching, combining
    4  formats, hotswapping
    5  tuning
    6  cli, demo, integrations

A module may import its own level or below; files must not import each other in a cycle; nothing but
the package's ``__init__`` and ``__main__`` imports the package root.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftlite

SRC = Path(peftlite.__file__).parent
LEVELS = {"functional": 0, "kernels": 0, "_version": 0, "layers": 1, "selection": 2, "state": 2, "merging": 3,
          "wrapping": 3, "switching": 3, "combining": 3, "formats": 4, "hotswapping": 4, "tuning": 5, "cli": 6,
          "demo": 6, "integrations": 6}
ROOT_FILES = ("peftlite", "peftlite.__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Every peftlite module a file imports (anywhere in it, lazy imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "peftlite"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "peftlite":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
            found |= set(subs) if len(subs) == len(node.names) else set(subs) | {target}
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(SRC.rglob("*.py"))}


def level(name: str) -> int:
    parts = name.split(".")
    return LEVELS[parts[1]] if len(parts) > 1 else 99


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Upward imports, root imports and cycles, as readable lines (empty when the structure holds)."""
    out = []
    for src, targets in edges.items():
        for dst in sorted(targets):
            if dst == "peftlite" and src not in ROOT_FILES:
                out.append(f"{src} imports the package root")
            elif src not in ROOT_FILES and level(dst) > level(src):
                out.append(f"{src} (level {level(src)}) imports {dst} (level {level(dst)}) upward")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                out.append("cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return out


def test_every_module_has_a_level():
    unknown = {n.split(".")[1] for n in graph() if n not in ROOT_FILES} - set(LEVELS)
    assert not unknown, f"add these top-level modules to LEVELS (and docs/design.md): {sorted(unknown)}"


def test_no_upward_import_no_cycle_no_root_import():
    assert violations(graph()) == []


@pytest.mark.parametrize("edges, expected", [
    ({"peftlite.layers.conv": {"peftlite.wrapping"}}, "upward"),
    ({"peftlite.tuning.report": {"peftlite"}}, "package root"),
    ({"peftlite.merging": {"peftlite.wrapping"}, "peftlite.wrapping": {"peftlite.merging"}}, "cycle"),
])
def test_the_checker_finds_each_kind_of_violation(edges, expected):
    assert any(expected in line for line in violations(edges))


def test_the_imports_it_reads_are_real():
    found = graph()
    assert "peftlite.layers.base" in found["peftlite.layers.conv"]
    assert "peftlite.functional" in found["peftlite.layers.base"]
    assert "peftlite.wrapping" in found["peftlite.formats.native"]
    assert {"peftlite.formats.native", "peftlite.wrapping"} <= found["peftlite"]
