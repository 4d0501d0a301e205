"""Security rule: nothing in kdpipe loads a pickle.

Scans every Python file of the product (core, steps, pipelines, CLI, benchmarks) for
``torch.load`` without ``weights_only=True`` and for pickle / cloudpickle / dill loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["src", "steps", "pipelines", "benchmarks", "examples", "run_pipeline.py"]
PICKLE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib"}


def _product_files() -> list[Path]:
    files: list[Path] = []
    for entry in SCANNED:
        path = ROOT / entry
        files.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    return files


def _violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        if owner_name == "torch" and node.func.attr == "load":
            safe = any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in node.keywords
            )
            if not safe:
                found.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
        if owner_name in PICKLE_MODULES and node.func.attr in {"load", "loads", "Unpickler"}:
            found.append(f"{name}:{node.lineno}: {owner_name}.{node.func.attr}")
    return found


def test_scanner_sees_the_product() -> None:
    assert len(_product_files()) >= 30


def test_no_pickle_loading_anywhere() -> None:
    problems = [v for f in _product_files() for v in _violations(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []


def test_scanner_catches_unsafe_loads() -> None:
    bad = "import torch, pickle\ntorch.load('x')\ntorch.load('y', weights_only=False)\npickle.loads(b'')\n"
    assert len(_violations(bad, "bad.py")) == 3
    assert _violations("import torch\ntorch.load('x', weights_only=True)\n", "ok.py") == []


def test_materializers_never_fall_back_to_pickling() -> None:
    """ZenML resolves each of our artifact types to a kdpipe materializer, not a pickling one."""
    from zenml.materializers.materializer_registry import materializer_registry

    from kdpipe.bundle import Bundle
    from kdpipe.data import DatasetSpec
    from kdpipe.evaluation import EvaluationReport
    from kdpipe.export import ExportResult
    from kdpipe.gate import GateDecision
    from steps import materializers

    for artifact_type in (Bundle, DatasetSpec, ExportResult, EvaluationReport, GateDecision):
        chosen = materializer_registry[artifact_type]
        assert chosen.__module__ == materializers.__name__, (artifact_type, chosen)
