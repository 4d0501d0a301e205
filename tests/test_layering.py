"""The core (src/kdpipe) must be usable without an orchestrator: no zenml imports."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "src" / "kdpipe"


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_has_python_files() -> None:
    assert len(list(CORE.rglob("*.py"))) >= 3


def test_core_never_imports_zenml() -> None:
    offenders = [str(p.relative_to(CORE)) for p in CORE.rglob("*.py") if "zenml" in _imported_roots(p)]
    assert offenders == [], f"core modules importing zenml: {offenders}"


def test_detector_catches_a_zenml_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from zenml import step\n")
    assert "zenml" in _imported_roots(bad)
