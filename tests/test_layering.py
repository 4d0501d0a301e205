"""The core's shape: no zenml, no import cycles, config and registry at the bottom, small
modules and functions.

The import graph counts every import, at module level and inside functions alike: a cycle
held open by a function-level import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "src" / "kdpipe"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# The bottom layer and the only kdpipe modules each may import (uris: the URI/path rules
# that config validates with and tracking redacts with).
BOTTOM = {"kdpipe.config": {"kdpipe.uris", "kdpipe.config_inputs", "kdpipe.config_deploy"},
          "kdpipe.config_inputs": set(), "kdpipe.config_deploy": set(),
          "kdpipe.registry": set(), "kdpipe.uris": set()}

# Known debt (issue 13), measured at c2909ba. Each entry must disappear, never grow: the
# tests below fail on any cycle (none is allowed), oversize module or long function NOT
# listed here, on a listed module that has grown past its recorded size, and on an entry
# that is no longer needed (so the list only shrinks).
KNOWN_LARGE_MODULES: dict[str, int] = {}  # module file -> lines at c2909ba
KNOWN_LONG_FUNCTIONS: dict[str, set[str]] = {}  # module file -> its functions over the limit


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def kdpipe_imports(path: Path, modules: set[str]) -> set[str]:
    """The kdpipe modules that ``path`` imports anywhere in its body (``from kdpipe import x``
    counts as importing ``kdpipe.x`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules and node.module != "kdpipe":
                found.add(node.module)
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    found.add(f"{node.module}.{alias.name}")
    return found - {"kdpipe"}


def import_graph(root: Path = CORE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    return {name: kdpipe_imports(path, modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name (N lines)`` for each function or method longer than ``limit`` lines
    (decorators and docstrings included: what a reader scrolls through)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - start + 1
            if length > limit:
                out.append(f"{node.name} ({length} lines)")
    return out


# ---------------------------------------------------------------------- the tests
def test_core_has_python_files() -> None:
    assert len(list(CORE.rglob("*.py"))) >= 3


def test_core_never_imports_zenml() -> None:
    offenders = [str(p.relative_to(CORE)) for p in CORE.rglob("*.py") if "zenml" in _imported_roots(p)]
    assert offenders == [], f"core modules importing zenml: {offenders}"


def test_no_import_cycle_in_the_core() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_config_and_registry_are_the_bottom_layer() -> None:
    graph = import_graph()
    for module, allowed in BOTTOM.items():
        assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}"


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_is_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    limit = KNOWN_LARGE_MODULES.get(path.name, MAX_MODULE_LINES)
    assert lines <= limit, f"{path.name}: {lines} lines (limit {limit}); split it"
    if path.name in KNOWN_LARGE_MODULES:
        assert lines > MAX_MODULE_LINES, f"{path.name} is small now: drop it from KNOWN_LARGE_MODULES"
    long = {f.split(" ")[0] for f in long_functions(path)}
    known = KNOWN_LONG_FUNCTIONS.get(path.name, set())
    assert long <= known, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {sorted(long - known)}"
    assert known <= long, f"{path.name}: drop {sorted(known - long)} from KNOWN_LONG_FUNCTIONS"


# ---------------------------------------------------- the detectors can fail
def test_detector_catches_a_zenml_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from zenml import step\n")
    assert "zenml" in _imported_roots(bad)


def test_detector_catches_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "kdpipe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from kdpipe.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from kdpipe import a  # lazy\n    return a\n")
    (pkg / "c.py").write_text("import kdpipe.a\n")
    graph = import_graph(pkg)
    assert graph["kdpipe.a"] == {"kdpipe.b"} and graph["kdpipe.b"] == {"kdpipe.a"}
    assert find_cycle(graph) in (["kdpipe.a", "kdpipe.b", "kdpipe.a"], ["kdpipe.b", "kdpipe.a", "kdpipe.b"])
    del graph["kdpipe.b"]
    assert find_cycle(graph) is None


def test_detector_measures_functions_with_their_decorators(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("@decorator\ndef f():\n" + "    x = 1\n" * 60 + "\ndef g():\n    pass\n")
    assert long_functions(src) == ["f (62 lines)"]
