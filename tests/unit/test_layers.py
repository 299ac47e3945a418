"""The package's layers hold: the run directory's files are named only in imm_ray/run/, and the
import graph of imm_ray (every import, function-level ones included) has no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "imm_ray"
RUN_LAYER = PACKAGE / "run"
# The run files every reader must reach through imm_ray/run/ (as a path: the name alone or after a "/").
_RUN_FILE = re.compile(r"(^|/)(state\.json|run\.yaml|accepted\.jsonl|eval_samples\.jsonl|metrics\.jsonl)$")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def test_run_files_are_named_only_in_the_run_layer() -> None:
    found = []
    for path in _modules().values():
        if RUN_LAYER in path.parents:
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                  and _RUN_FILE.search(node.value)]
    assert not found, "read run files through imm_ray/run/ (its layout names them):\n" + "\n".join(found)


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The imm_ray modules ``module`` imports anywhere in its file (a name from a package counts as
    its submodule where one exists, else as the package)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or None (depth-first search, colouring the modules on the path)."""
    on_path: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: finished

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        on_path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return on_path[on_path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        on_path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
