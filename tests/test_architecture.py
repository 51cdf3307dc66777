"""The layers hold: the import contract in pyproject.toml (lint-imports) and no import cycle between modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contract_holds():
    # jobs -> pipeline -> dalle2; inside pipeline stages -> loaders -> execution -> formats -> run; no stage
    # imports another. No ignore_imports: a new edge across a layer fails here, naming the import and its line.
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--no-cache", "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def import_cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted: every import cycle's modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:  # recursion depth is bounded by the module count (about a hundred)
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in imports.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return groups


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set(), "c": {"a"}}) == []


def test_no_module_imports_itself_back():
    # function-level imports count: a cycle hidden inside a function still ties two modules together
    import grimp

    graph = grimp.build_graph("dalle2", "pipeline", "jobs", cache_dir=None)
    imports = {m: {t for t in graph.find_modules_directly_imported_by(m) if not graph.find_children(t) or t == m}
               for m in graph.modules}
    # a package's __init__ is imported by its children's import machinery, not by their code: count modules only
    modules = {m for m in graph.modules if not graph.find_children(m)}
    imports = {m: targets & modules for m, targets in imports.items() if m in modules}
    assert import_cycles(imports) == []
