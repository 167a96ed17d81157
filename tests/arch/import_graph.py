"""The package-level import graph of a source tree, read from its files (no import runs)."""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    """``fuselm.engine.engine`` for ``<root>/fuselm/engine/engine.py``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def unit_of(module: str, top: str) -> str | None:
    """The unit a module belongs to: its subpackage (``engine``) or top-level module
    (``config``); None outside ``top`` or for ``top`` itself."""
    parts = module.split(".")
    if parts[0] != top or len(parts) < 2:
        return None
    return parts[1]


def package_graph(root: Path, top: str) -> dict[str, set[str]]:
    """unit -> units it imports (self-edges dropped); units are subpackages and top modules."""
    units = {p.name if p.is_dir() else p.stem for p in (root / top).iterdir()
             if (p.is_dir() and any(p.rglob("*.py"))) or p.suffix == ".py"}
    units.discard("__init__")
    graph: dict[str, set[str]] = {u: set() for u in units}
    for path in sorted((root / top).rglob("*.py")):
        module = module_name(root, path)
        src = unit_of(module, top)
        if src is None:
            continue
        for target in imported_modules(path, module, path.name == "__init__.py"):
            dst = unit_of(target, top)
            if dst is not None and dst != src and dst in units:
                graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_edges(graph: dict[str, set[str]], lower: set[str],
                    upper: set[str]) -> list[tuple[str, str]]:
    """Edges from a ``lower`` unit into an ``upper`` one."""
    return sorted((a, b) for a in lower for b in graph.get(a, ()) if b in upper)


def private_imports_across_units(root: Path, top: str) -> list[tuple[str, str]]:
    """(importing module, imported name) for every private name (a leading underscore, at any
    level of the dotted path) that one unit imports from another."""
    found = []
    for path in sorted((root / top).rglob("*.py")):
        module = module_name(root, path)
        src = unit_of(module, top)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if (unit_of(name, top) not in (None, src)
                        and any(p.startswith("_") and not p.startswith("__") for p in parts)):
                    found.append((module, name))
    return sorted(found)
