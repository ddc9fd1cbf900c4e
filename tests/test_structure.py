"""The layout stays the one docs/architecture.md draws: imports point down only, and no import cycle.

Read from the source with :mod:`ast` (imports under ``if TYPE_CHECKING:`` are annotations, not
imports at run time, and are left out); nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

from dataplane.testing.commands import ROOT

PACKAGES = ("dataplane", "qmp_driver")

#: Layer of a module (by prefix); a module may import only from its own layer or lower ones.
LAYERS = [
    ("dataplane.aio", 0), ("dataplane.units", 0), ("dataplane.native", 0),
    ("qmp_driver", 1),
    ("dataplane.channel", 2), ("dataplane.storage", 2),
    ("dataplane.migration", 3),
    ("dataplane.progress", 4), ("dataplane.daemon", 4),
    ("dataplane.cli", 5),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                base = ".".join(up[: len(up) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {d for d in _runtime_imports(path, name) if d in modules and d != name}
        graph[name] = deps
    return graph


def _layer(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def test_imports_point_down_only() -> None:
    wrong = []
    for module, deps in _graph().items():
        if module.startswith("dataplane.testing") or module in ("dataplane.demo", "dataplane.__main__"):
            continue  # the test harness and the demo stand beside the layers, on top of them
        mine = _layer(module)
        for dep in deps:
            theirs = _layer(dep)
            if dep.startswith("dataplane.testing"):
                wrong.append(f"{module} imports the test harness {dep}")
            elif mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} (layer {mine}) imports {dep} (layer {theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
