"""Determinism: the same config and seed give identical metrics and ONNX weights on CPU.

The core path the pipeline runs (teacher -> distilled student -> pruned student -> ONNX)
is run twice in one process on the bundled digits with one or two epochs each. Running
both in one process is the strict version: the second run starts from whatever global
RNG state the first left behind, as a pipeline step does when an earlier step ran in the
same process (or was served from cache and did not), so anything the recipes leave
unseeded shows up here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import numpy_helper

from kdpipe import recipes
from kdpipe.config import (
    DataConfig,
    ExportConfig,
    ModelConfig,
    PipelineConfig,
    PruneConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from kdpipe.data import build_dataset_spec
from kdpipe.export import export_onnx

pytestmark = pytest.mark.slow

CONFIG = PipelineConfig(
    data=DataConfig(source="digits", batch_size=64),
    teacher=TeacherConfig(model=ModelConfig(arch="cnn_small"),
                          train=TrainConfig(epochs=1, lr=0.01, scheduler="none", seed=3)),
    student=StudentConfig(model=ModelConfig(arch="cnn_tiny"),
                          train=TrainConfig(epochs=2, lr=0.01, scheduler="none", seed=3)),
    prune=PruneConfig(ratio=0.5, recovery=TrainConfig(epochs=1, lr=0.002, scheduler="none", seed=3)),
    export=ExportConfig(),
)


def _core_path(tmp: Path) -> dict[str, Any]:
    spec = build_dataset_spec(CONFIG.data)
    teacher = recipes.train_teacher(spec, CONFIG.teacher)
    student = recipes.distill_student(spec, teacher, CONFIG.student, CONFIG.distill)
    pruned, _ = recipes.prune_student(student, teacher, spec, CONFIG.prune, CONFIG.distill)
    result = export_onnx(pruned, tmp / "student.onnx", CONFIG.export)
    graph = onnx.load(str(result.path)).graph
    bundles = {"teacher": teacher, "student": student, "pruned_student": pruned}
    return {
        "metrics": {name: recipes.bundle_metrics(b) for name, b in bundles.items()},
        "history": {name: [{k: v for k, v in row.items() if k != "seconds"}
                           for row in b.spec.extra["history"]] for name, b in bundles.items()},
        "weights_sha256": {name: b.spec.weights_sha256 for name, b in bundles.items()},
        "initializers": {t.name: numpy_helper.to_array(t) for t in graph.initializer},
        "onnx_sha256": result.sha256,
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    return (_core_path(tmp_path_factory.mktemp("first")),
            _core_path(tmp_path_factory.mktemp("second")))


def test_metrics_and_curves_are_identical(two_runs: tuple[dict, dict]) -> None:
    first, second = two_runs
    assert first["metrics"]["teacher"]["test_accuracy"] > 0.2  # it trained at all
    assert first["metrics"] == second["metrics"]  # exact: no tolerance on CPU
    assert first["history"] == second["history"]
    assert first["weights_sha256"] == second["weights_sha256"]


def test_onnx_initializers_are_byte_identical(two_runs: tuple[dict, dict]) -> None:
    first, second = two_runs
    assert len(first["initializers"]) >= 4  # convs + classifier at least
    assert first["initializers"].keys() == second["initializers"].keys()
    for name, array in first["initializers"].items():
        other = second["initializers"][name]
        assert (array.dtype, array.shape) == (other.dtype, other.shape), name
        assert array.tobytes() == other.tobytes(), name
    assert first["onnx_sha256"] == second["onnx_sha256"]  # the whole file, metadata included
