"""The layout of ARCHITECTURE.md holds: what each part may import, no import circle, short functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "i2e_train"

# Part of the package -> the parts it may import (its own modules always). A part is a top-level
# module or sub-package; data.catalog is the catalog of facts, importable from anywhere below tasks.
ALLOWED = {
    "files": set(), "naming": set(), "kernels": set(), "codec": set(),
    "config": {"data.catalog", "data.local", "models.released"},  # the resolvers read facts
    "schema": {"config"},  # stored configs checked against the config groups
    "i2e": {"kernels", "codec"},
    "data": {"codec", "i2e", "files", "naming"},
    "models": {"kernels", "files", "naming", "data.catalog", "schema"},
    "module": {"kernels", "models"},
    "plots": {"files"}, "tracking": {"files"}, "sweeps": {"files"},
    "viz": {"codec", "i2e", "files", "data"},
    "callbacks": {"files", "plots", "tracking", "viz"},
    "recovery": {"files", "callbacks"},
    "convert": {"codec", "i2e", "files", "data"},
    "tasks": {"config", "schema", "files", "data", "models", "module", "recovery", "callbacks", "plots", "tracking",
              "sweeps"},
    "cli": {"config", "files", "tasks"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every i2e_train module ``name`` imports, at module level or inside functions."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (["i2e_train"] + (name.split(".") if name else []))
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}".removeprefix("i2e_train.") in modules else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t == "i2e_train" or not t.startswith("i2e_train."):
                continue
            t = t.removeprefix("i2e_train.")
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    return module.split(".", 1)[0]


def test_every_part_imports_only_what_it_may():
    bad = []
    for mod, targets in _graph().items():
        if not mod:  # the package itself: config_dir and the resolvers
            assert targets <= {"config"}, targets
            continue
        part = _part(mod)
        assert part in ALLOWED, f"{mod}: a new part of the package; add it to ARCHITECTURE.md and ALLOWED here"
        for t in targets:
            if _part(t) == part or t in ALLOWED[part] or _part(t) in ALLOWED[part]:
                continue
            bad.append(f"{mod} imports {t}")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("limit", [100])
def test_no_function_over_the_limit(limit):
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
