"""Print the longest functions of dataplane/ and qmp_driver/ (lines from ``def`` to the last line).

Usage: ``python3 scripts/longest_functions.py [ROOT] [N]`` (default: this checkout, 10). Reads the
source with :mod:`ast`; imports nothing of the project.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def longest(root: Path, n: int) -> list[tuple[int, str]]:
    rows: list[tuple[int, str]] = []
    for pkg in ("dataplane", "qmp_driver"):
        for path in sorted((root / pkg).rglob("*.py")):
            stack: list[tuple[ast.AST, str]] = [(ast.parse(path.read_text()), "")]
            while stack:
                node, prefix = stack.pop()
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                        name = f"{prefix}{child.name}"
                        size = (child.end_lineno or child.lineno) - child.lineno + 1
                        rows.append((size, f"{path.relative_to(root)}:{child.lineno} {name}"))
                        stack.append((child, name + "."))
                    elif isinstance(child, ast.ClassDef):
                        stack.append((child, f"{prefix}{child.name}."))
    return sorted(rows, reverse=True)[:n]


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    for size, where in longest(root, int(sys.argv[2]) if len(sys.argv) > 2 else 10):
        print(f"{size:4d}  {where}")
