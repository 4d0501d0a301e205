"""The INT8 candidate end to end in the core: quantise an export, evaluate both, gate, pick.

Real components on tiny models (seconds): cnn_tiny trained one epoch on the bundled
digits, exported by kdpipe.export, quantised by ONNX Runtime, evaluated by
kdpipe.evaluation and decided by kdpipe.gate. The pipeline wiring (step, artifact,
MLflow) rides on tests/test_pipeline.py's runs; promotion and predict of an INT8 champion
on tests/test_promotion.py's scenario.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from kdpipe.bundle import Bundle
from kdpipe.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ExportConfig,
    GateConfig,
    QuantizeConfig,
    TrainConfig,
)
from kdpipe.cpu import CpuFeatures
from kdpipe.data import build_dataset_spec, make_loader
from kdpipe.evaluation import CANDIDATE, INT8_CANDIDATE, evaluate_models
from kdpipe.export import export_onnx, read_metadata
from kdpipe.gate import decide
from kdpipe.models import create_model
from kdpipe.quantize_candidate import quantize_export, raw_split
from kdpipe.train import ClassificationTask, fit

VNNI = CpuFeatures("x86_64", "Test Xeon", frozenset({"avx2", "avx512f", "avx512_vnni"}))
EVAL = EvalConfig(latency_batch_sizes=(1, 8), latency_repeats=3, latency_warmup=0)
QUANT = QuantizeConfig(enabled=True, calibration_size=100)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = build_dataset_spec(DataConfig(source="digits", batch_size=64))
    torch.manual_seed(0)
    model = create_model("cnn_small", spec.num_classes, spec.in_channels)
    fit(model, ClassificationTask(), make_loader(spec, "train", train=True),
        make_loader(spec, "val", train=False), TrainConfig(epochs=2, device="cpu", lr=3e-3))
    bundle = Bundle.from_model(model.eval(), arch="cnn_small", classes=spec.classes,
                               input_shape=spec.input_shape, mean=spec.mean, std=spec.std)
    tmp = tmp_path_factory.mktemp("int8")
    export = export_onnx(bundle, tmp / "student.onnx", ExportConfig(exporter="torchscript"))
    outcome = quantize_export(spec, export, tmp / "student.int8.onnx", QUANT, features=VNNI)
    return {"spec": spec, "bundle": bundle, "export": export, "outcome": outcome, "tmp": tmp}


def test_the_int8_candidate_carries_the_fp32_metadata_and_its_settings(world: dict) -> None:
    outcome, export = world["outcome"], world["export"]
    assert outcome.available, outcome.reason
    result = outcome.result
    assert Path(result.path).is_file() and result.size_bytes < export.size_bytes
    assert outcome.fp32_sha256 == export.sha256 == result.fp32_sha256
    assert outcome.fp32_metadata == export.metadata
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert meta["precision"] == "int8" and export.metadata["precision"] == "fp32"
    assert read_metadata(export.path)["precision"] == "fp32"
    assert {k: meta[k] for k in export.metadata if k != "precision"} == {
        k: v for k, v in export.metadata.items() if k != "precision"}
    assert result.settings.short == "QDQ U8S8 per-channel"
    assert sum(result.settings.calibration_classes.values()) == 100
    assert outcome.reason.startswith("INT8 candidate (accuracy control on the val split)")
    summary = outcome.metadata()
    assert summary["int8_available"] is True and summary["settings"] == "QDQ U8S8 per-channel"


def test_accuracy_control_measures_on_the_val_split(world: dict) -> None:
    import onnxruntime as ort

    result = world["outcome"].result
    x, y = raw_split(world["spec"], "val")
    assert len(x) == world["spec"].split_sizes["val"]
    session = ort.InferenceSession(world["export"].path, providers=["CPUExecutionProvider"])
    fp32_val = float((session.run(None, {"pixels": x})[0].argmax(1) == y).mean())
    assert result.fp32_accuracy == pytest.approx(fp32_val, abs=1e-12)


def test_a_quantiser_failure_leaves_no_int8_candidate_and_says_why(world: dict) -> None:
    model = onnx.load(world["export"].path)
    first = model.graph.node[0]
    original = first.output[0]
    first.output[0] = f"{original}_before"
    model.graph.node.insert(1, helper.make_node("Mystery", [f"{original}_before"], [original],
                                                name="mystery_node", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    bad = world["tmp"] / "bad.onnx"
    onnx.save(model, str(bad))
    export = world["export"].model_copy(update={"path": str(bad)})
    out = world["tmp"] / "bad.int8.onnx"
    outcome = quantize_export(world["spec"], export, out, QUANT, features=VNNI)
    assert outcome.result is None and not outcome.available and not out.exists()
    assert outcome.reason.startswith("no INT8 candidate: ONNX Runtime's")
    assert "Mystery (node 'mystery_node'" in outcome.reason
    assert outcome.metadata()["int8_available"] is False


def test_a_calibration_sample_larger_than_the_train_split_is_a_config_error(world: dict) -> None:
    too_big = QUANT.model_copy(update={"calibration_size": 100_000})
    with pytest.raises(ConfigError, match="larger than the train split"):
        quantize_export(world["spec"], world["export"], world["tmp"] / "x.onnx", too_big)


def test_both_candidates_are_evaluated_and_gated(world: dict) -> None:
    b, result = world["bundle"], world["outcome"].result
    report = evaluate_models(world["spec"], b, b, b, world["export"].path, EVAL,
                             int8_path=result.path)
    assert report.candidates == [CANDIDATE, INT8_CANDIDATE]
    fp32, int8 = report.models[CANDIDATE], report.models[INT8_CANDIDATE]
    assert (fp32.precision, int8.precision, fp32.agreement) == ("fp32", "int8", None)
    assert int8.size_bytes == result.size_bytes and [s.batch_size for s in int8.latency] == [1, 8]
    assert sum(map(sum, int8.confusion)) == int8.num_samples == fp32.num_samples
    # Agreement recomputed here from the two files on the same raw test pixels.
    import onnxruntime as ort

    x, _ = raw_split(world["spec"], "test")
    preds = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
             .argmax(1) for p in (world["export"].path, result.path)]
    assert int8.agreement == pytest.approx(float(np.mean(preds[0] == preds[1])), abs=1e-12)
    assert int8.agreement >= 0.95
    assert report.metadata()["onnx_int8_agreement"] == int8.agreement
    gate = GateConfig(min_accuracy=None, max_drop_vs_teacher=None, min_compression=None,
                      min_agreement=0.95, prefer="smallest")
    decision = decide(report, gate)
    assert decision.chosen == INT8_CANDIDATE, decision.summary()
    assert [v.name for v in decision.candidates] == [CANDIDATE, INT8_CANDIDATE]
