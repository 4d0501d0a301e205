"""kdpipe.evaluation on the digits test split with tiny (untrained) models.

The ONNX models here are exported by a local helper (normalisation inside the graph, as
kdpipe.export does) so that this file tests the evaluation alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.bundle import Bundle
from kdpipe.config import DataConfig, EvalConfig
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.evaluation import (
    EvaluationError,
    EvaluationReport,
    ProductionCandidate,
    compatibility_problem,
    evaluate_models,
)
from kdpipe.metrics import count_macs, count_params, serialized_size_bytes
from kdpipe.models import create_model
from kdpipe.train import evaluate

EVAL = EvalConfig(latency_batch_sizes=(1, 4), latency_repeats=3, latency_warmup=0)


class _RawPixels(nn.Module):
    """model((x - mean) / std): what the exported ONNX graph computes."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def export_raw(bundle: Bundle, path: Path) -> Path:
    """Export a bundle's model to ONNX with raw-pixel input and a dynamic batch axis."""
    wrapped = _RawPixels(bundle.model, bundle.spec.mean, bundle.spec.std).eval()
    example = torch.rand(2, *bundle.spec.input_shape)
    torch.onnx.export(wrapped, (example,), str(path), input_names=["input"],
                      output_names=["logits"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def make_bundle(arch: str, spec, seed: int, classes: list[str] | None = None) -> Bundle:
    torch.manual_seed(seed)
    classes = classes or spec.classes
    model = create_model(arch, len(classes), spec.input_shape[0]).eval()
    return Bundle.from_model(model, arch=arch, classes=classes, input_shape=spec.input_shape,
                             mean=spec.mean, std=spec.std)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = build_dataset_spec(DataConfig(source="digits", eval_batch_size=128))
    tmp = tmp_path_factory.mktemp("evaluation")
    teacher = make_bundle("cnn_small", spec, 0)
    student = make_bundle("cnn_tiny", spec, 1)
    pruned = make_bundle("cnn_tiny", spec, 2)
    return {"spec": spec, "teacher": teacher, "student": student, "pruned": pruned,
            "onnx": export_raw(pruned, tmp / "pruned.onnx"), "tmp": tmp}


def run(world: dict, **kwargs) -> EvaluationReport:
    return evaluate_models(world["spec"], world["teacher"], world["student"], world["pruned"],
                           world["onnx"], EVAL, **kwargs)


@pytest.fixture(scope="module")
def report(world: dict) -> EvaluationReport:
    return run(world)


def test_pytorch_numbers_match_the_training_loops_evaluate(world: dict,
                                                           report: EvaluationReport) -> None:
    loader = make_loader(world["spec"], "test", train=False)  # normalised input
    for name, key in (("teacher", "teacher"), ("student", "student"),
                      ("pruned_student", "pruned")):
        expected = evaluate(world[key].model, loader)
        got = report.models[name]
        assert got.accuracy == pytest.approx(expected.accuracy, abs=1e-12)
        assert got.confusion == expected.confusion
        assert got.num_samples == world["spec"].split_sizes["test"]
        assert got.params == count_params(world[key].model)
        assert got.macs == count_macs(world[key].model, world["spec"].input_shape)
        assert got.size_bytes == serialized_size_bytes(world[key].model)


def test_onnx_model_matches_the_pruned_student(world: dict, report: EvaluationReport) -> None:
    onnx, pruned = report.models["onnx"], report.models["pruned_student"]
    assert onnx.runtime == "onnxruntime"
    assert onnx.accuracy == pytest.approx(pruned.accuracy, abs=1e-12)
    assert onnx.confusion == pruned.confusion
    assert onnx.params == pruned.params and onnx.macs == pruned.macs
    assert onnx.size_bytes == world["onnx"].stat().st_size
    assert 0.0 <= report.parity_max_abs_diff < 1e-4


def test_confusion_and_per_class_accuracy_are_consistent(report: EvaluationReport) -> None:
    cm = np.array(report.candidate.confusion)
    assert cm.shape == (10, 10)
    assert cm.sum() == report.candidate.num_samples
    assert report.candidate.accuracy == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
    recall = np.diag(cm) / cm.sum(axis=1)
    np.testing.assert_allclose(report.candidate.per_class_accuracy, recall, atol=1e-12)


def _timed_model(world: dict, out: object) -> str:
    """Which model produced ``out``: ONNX Runtime returns arrays, PyTorch tensors."""
    if isinstance(out, np.ndarray):
        return "onnx"
    shape = (out.shape[0], *world["spec"].input_shape)
    x = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))  # as timed
    for name, key in (("teacher", "teacher"), ("student", "student"),
                      ("pruned_student", "pruned")):
        b = world[key]
        mean = torch.tensor(b.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(b.spec.std).view(1, -1, 1, 1)
        with torch.no_grad():
            if torch.allclose(b.model((x - mean) / std), out, atol=1e-6):
                return name
    raise AssertionError("a timed call came from none of the models")


def test_latency_is_measured_at_each_batch_size(world: dict, monkeypatch) -> None:
    """Each model is timed at each configured batch size, with the configured repeats."""
    from kdpipe import metrics

    real = metrics.latency_stats
    timed: list[tuple[str, int, int, dict[str, float]]] = []

    def spy(fn, repeats: int, warmup: int, **kwargs) -> dict[str, float]:
        outputs = []
        stats = real(lambda: outputs.append(fn()), repeats=repeats, warmup=warmup, **kwargs)
        timed.append((_timed_model(world, outputs[-1]), len(outputs[-1]), len(outputs), stats))
        return stats

    monkeypatch.setattr(metrics, "latency_stats", spy)
    cfg = EvalConfig(latency_batch_sizes=(2, 5), latency_repeats=4, latency_warmup=1)
    report = evaluate_models(world["spec"], world["teacher"], world["student"], world["pruned"],
                             world["onnx"], cfg)
    models = ("teacher", "student", "pruned_student", "onnx")
    # (model, batch size, calls = warm-up + repeats) for every timing, in order.
    assert [t[:3] for t in timed] == [(m, b, 5) for m in models for b in (2, 5)]
    for i, (name, batch, _, stats) in enumerate(timed):
        recorded = report.models[name].latency[i % 2]
        assert recorded.batch_size == batch
        assert (recorded.p50_ms, recorded.p95_ms, recorded.mean_ms) == (
            stats["p50_ms"], stats["p95_ms"], stats["mean_ms"])  # the numbers of that timing
    assert report.candidate.latency_at(5) is not None
    assert report.candidate.latency_at(1) is None


def test_no_production_is_recorded_as_absent(report: EvaluationReport) -> None:
    assert report.production.status == "absent"
    assert report.production.reason == "no production model"
    assert report.production.evaluation is None
    assert "production_accuracy" not in report.metadata()


@pytest.mark.slow
def test_compatible_production_is_evaluated_on_the_same_split(world: dict) -> None:
    # The same file as production: its numbers must equal the candidate's exactly.
    prod = ProductionCandidate(onnx_path=world["onnx"], version="7",
                               classes=world["spec"].classes,
                               input_shape=world["spec"].input_shape, params=123)
    report = run(world, production=prod)
    assert report.production.status == "evaluated"
    assert report.production.version == "7"
    ev = report.production.evaluation
    assert ev is not None
    assert ev.accuracy == pytest.approx(report.candidate.accuracy, abs=1e-12)
    assert ev.confusion == report.candidate.confusion
    assert ev.params == 123
    assert report.metadata()["production_accuracy"] == pytest.approx(ev.accuracy)


@pytest.mark.slow
def test_production_with_other_classes_is_incompatible_not_a_crash(world: dict) -> None:
    other = make_bundle("cnn_tiny", world["spec"], 3, classes=["a", "b", "c"])
    prod = ProductionCandidate(onnx_path=export_raw(other, world["tmp"] / "abc.onnx"),
                               version="2", classes=["a", "b", "c"],
                               input_shape=world["spec"].input_shape)
    report = run(world, production=prod)
    assert report.production.status == "incompatible"
    assert report.production.reason.startswith("classes differ: production ['a', 'b', 'c'] vs")
    assert report.production.evaluation is None


@pytest.mark.slow
def test_unreadable_production_is_recorded(world: dict) -> None:
    broken = world["tmp"] / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    prod = ProductionCandidate(onnx_path=broken, version="4", classes=world["spec"].classes,
                               input_shape=world["spec"].input_shape)
    report = run(world, production=prod)
    assert report.production.status == "unreadable"
    assert "ONNX Runtime cannot load" in report.production.reason


def test_compatibility_problem_names_both_shapes() -> None:
    assert compatibility_problem(["0", "1"], (1, 8, 8), ["0", "1"], (1, 8, 8)) is None
    assert compatibility_problem(["0", "1"], (3, 32, 32), ["0", "1"], (1, 8, 8)) == (
        "input shapes differ: production (3, 32, 32) vs dataset (1, 8, 8)")


def test_candidate_with_wrong_class_count_fails_with_both_shapes(world: dict) -> None:
    other = make_bundle("cnn_tiny", world["spec"], 3, classes=["a", "b", "c"])
    path = export_raw(other, world["tmp"] / "three.onnx")
    with pytest.raises(EvaluationError, match=r"shape \(128, 3\).*expected \(128, 10\) logits"):
        evaluate_models(world["spec"], world["teacher"], world["student"], world["pruned"],
                        path, EVAL)


def test_missing_candidate_file_is_named(world: dict) -> None:
    with pytest.raises(EvaluationError, match="ONNX Runtime cannot load .*missing.onnx"):
        evaluate_models(world["spec"], world["teacher"], world["student"], world["pruned"],
                        world["tmp"] / "missing.onnx", EVAL)


def test_report_round_trips_through_json(report: EvaluationReport) -> None:
    again = EvaluationReport.model_validate_json(report.model_dump_json())
    assert again == report
