"""INT8 quantisation with ONNX Runtime: settings, calibration, accuracy control, errors.

Real components throughout: cnn_small trained briefly on the bundled digits, exported by
kdpipe.export, quantised by ONNX Runtime's own quantiser.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pydantic
import pytest
import torch
from onnx import helper

from kdpipe.bundle import Bundle
from kdpipe.config import (
    ConfigError,
    DataConfig,
    ExportConfig,
    PipelineConfig,
    QuantizeConfig,
    TrainConfig,
)
from kdpipe.cpu import CpuFeatures, parse_cpuinfo
from kdpipe.data import build_dataset_spec, get_split, make_loader
from kdpipe.export import export_onnx, read_metadata
from kdpipe.models import create_model
from kdpipe.quantize import (
    QuantizeError,
    calibration_sample,
    default_types,
    onnx_accuracy,
    quantize_model,
    resolve_settings,
    vnni_warning,
)
from kdpipe.quantize_calib import balanced_positions
from kdpipe.train import ClassificationTask, fit
from kdpipe.validate import find_problems

VNNI = CpuFeatures("x86_64", "Test Xeon", frozenset({"avx2", "avx512f", "avx512_vnni"}))
NO_VNNI = CpuFeatures("x86_64", "Old Core", frozenset({"avx2"}))
ARM = CpuFeatures("aarch64", "Neoverse", frozenset({"asimddp"}))


@pytest.fixture(scope="module")
def digits():
    return build_dataset_spec(DataConfig(source="digits", batch_size=64))


@pytest.fixture(scope="module")
def fp32(digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cnn_small trained for 3 epochs on digits (about 92% test accuracy), exported."""
    torch.manual_seed(0)
    model = create_model("cnn_small", digits.num_classes, digits.in_channels)
    fit(model, ClassificationTask(), make_loader(digits, "train", train=True),
        make_loader(digits, "val", train=False), TrainConfig(epochs=3, device="cpu", lr=3e-3))
    bundle = Bundle.from_model(model.eval(), arch="cnn_small", classes=digits.classes,
                               input_shape=digits.input_shape, mean=digits.mean, std=digits.std)
    path = tmp_path_factory.mktemp("fp32") / "student.onnx"
    export_onnx(bundle, path, ExportConfig(), source_run="run-7")
    return path


@pytest.fixture(scope="module")
def test_split(digits) -> tuple[np.ndarray, np.ndarray]:
    split = get_split(digits, "test", normalize=False)
    items = [split[i] for i in range(len(split))]
    return (np.stack([x.numpy() for x, _, _ in items]),
            np.array([int(y) for _, y, _ in items]))


@pytest.fixture(scope="module")
def calibration(digits) -> tuple[np.ndarray, np.ndarray]:
    return calibration_sample(digits, 200, seed=0)


def _logits(path: Path | str, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": pixels})[0]


def _relative_error(path: Path | str, fp32: Path, pixels: np.ndarray) -> float:
    ref = _logits(fp32, pixels)
    return float(np.linalg.norm(_logits(path, pixels) - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------ CPU, settings
def test_cpu_flags_are_parsed_from_cpuinfo() -> None:
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx_vnni\n\n"
            "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    features = parse_cpuinfo(text, "x86_64")
    assert features.model_name == "Intel(R) Xeon(R) Processor"
    assert features.flags == {"avx2", "avx512f", "avx512_vnni", "avx_vnni"}
    assert features.has_vnni and not features.is_arm
    arm = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp\n", "aarch64")
    assert arm.is_arm and arm.flags == {"asimddp"} and not arm.has_vnni


@pytest.mark.parametrize("features, act, weight, reduce", [
    (VNNI, "uint8", "int8", False), (NO_VNNI, "uint8", "int8", True), (ARM, "int8", "int8", False)])
def test_default_types_follow_the_cpu(features: CpuFeatures, act: str, weight: str,
                                      reduce: bool) -> None:
    chosen = default_types(features)
    assert (chosen["format"], chosen["activation_type"], chosen["weight_type"],
            chosen["reduce_range"]) == ("qdq", act, weight, reduce)
    settings = resolve_settings(QuantizeConfig(), features)
    assert settings.per_channel and settings.reason == chosen["reason"]


def test_configured_types_override_the_cpu_default() -> None:
    cfg = QuantizeConfig(format="qoperator", activation_type="int8", reduce_range=True)
    settings = resolve_settings(cfg, VNNI, {"0": 3})
    assert (settings.format, settings.activation_type, settings.weight_type,
            settings.reduce_range) == ("qoperator", "int8", "int8", True)
    assert settings.reason.startswith("configured (format, activation_type, reduce_range)")
    assert settings.short == "QOPERATOR S8S8 per-channel" and settings.calibration_size == 3


def test_warning_only_without_int8_dot_products() -> None:
    assert vnni_warning(VNNI) is None and vnni_warning(ARM) is None
    text = vnni_warning(NO_VNNI)
    assert "no INT8 dot-product instructions (VNNI)" in text and "Old Core" in text
    assert "latency check decides" in text


def test_unsupported_type_pair_and_bad_values_are_config_errors() -> None:
    s8u8 = QuantizeConfig(enabled=True, activation_type="int8", weight_type="uint8")
    problems = find_problems(PipelineConfig(data=DataConfig(source="digits"), quantize=s8u8))
    assert [p.path for p in problems] == ["parameters.quantize.weight_type"]
    assert "int8 with weight_type uint8 is not supported" in problems[0].message
    with pytest.raises(ConfigError, match="int8 with weight_type uint8"):
        resolve_settings(s8u8, VNNI)
    with pytest.raises(ConfigError, match="int8 with weight_type uint8"):  # auto on ARM: int8
        resolve_settings(QuantizeConfig(weight_type="uint8"), ARM)
    with pytest.raises(pydantic.ValidationError, match="calibration_method"):
        QuantizeConfig(calibration_method="kl")
    with pytest.raises(pydantic.ValidationError, match="max_drop"):
        QuantizeConfig(max_drop=-0.01)
    assert PipelineConfig().quantize.enabled is False  # today's pipeline by default


# ------------------------------------------------------------------ calibration
def test_balanced_positions_round_robin_over_classes() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 4)
    chosen = balanced_positions(labels, 20, seed=3)
    assert len(set(chosen)) == 20
    assert np.bincount(labels[chosen]).tolist() in ([8, 8, 4], [8, 8, 4])  # class 2 gives all 4
    assert np.bincount(labels[balanced_positions(labels, 9, seed=3)]).tolist() == [3, 3, 3]
    assert not np.array_equal(chosen, balanced_positions(labels, 20, seed=4))


def test_calibration_sample_is_class_balanced_raw_train_pixels(digits, calibration) -> None:
    pixels, labels = calibration
    assert pixels.shape == (200, 1, 8, 8) and pixels.dtype == np.float32
    assert np.bincount(labels).tolist() == [20] * 10
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0  # raw, not normalised
    again, _ = calibration_sample(digits, 200, seed=0)
    np.testing.assert_array_equal(pixels, again)
    odd = np.bincount(calibration_sample(digits, 25, seed=1)[1])
    assert sorted(odd.tolist()) == [2] * 5 + [3] * 5


def test_calibration_size_against_the_data_is_a_config_error(digits) -> None:
    with pytest.raises(ConfigError, match=r"larger than the train split \(1257 samples\)"):
        calibration_sample(digits, 1258)
    with pytest.raises(ConfigError, match=r"smaller than the number of classes \(10\)"):
        calibration_sample(digits, 9)
    data = DataConfig(source="digits")
    problems = [str(p) for p in find_problems(PipelineConfig(
        data=data, quantize=QuantizeConfig(enabled=True, calibration_size=1258)))]
    assert problems == ["parameters.quantize.calibration_size: the calibration sample (1258) is "
                        "larger than the train split (1257 samples); lower "
                        "quantize.calibration_size to at most 1257"]
    small = find_problems(PipelineConfig(data=data, quantize=QuantizeConfig(
        enabled=True, calibration_size=4)))
    assert [p.path for p in small] == ["parameters.quantize.calibration_size"]
    assert "at least 10" in small[0].message
    off = QuantizeConfig(calibration_size=4)  # disabled: not checked
    assert find_problems(PipelineConfig(data=data, quantize=off)) == []


# --------------------------------------------------------------- quantised model
@pytest.fixture(scope="module")
def int8(fp32, calibration, test_split, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("int8") / "student-int8.onnx"
    pixels, labels = calibration
    return quantize_model(fp32, out, pixels, QuantizeConfig(enabled=True),
                          calibration_labels=labels, evaluate=onnx_accuracy(*test_split),
                          features=VNNI)


def test_int8_model_agrees_with_fp32(int8, fp32, test_split) -> None:
    pixels, labels = test_split
    q, f = _logits(int8.path, pixels), _logits(fp32, pixels)
    assert (q.argmax(1) == f.argmax(1)).mean() >= 0.97
    assert _relative_error(int8.path, fp32, pixels) < 0.05
    assert int8.fp32_accuracy == pytest.approx(float((f.argmax(1) == labels).mean()))
    assert int8.int8_accuracy == pytest.approx(float((q.argmax(1) == labels).mean()))
    assert int8.fp32_accuracy > 0.85 and int8.accuracy_drop <= 0.01
    assert int8.within_limit is True and int8.control_steps == [] and int8.sensitivity == []
    summary = int8.summary()
    assert summary["precision"] == "int8" and summary["quant_activation_type"] == "uint8"
    assert summary["accuracy_drop"] == int8.accuracy_drop and summary["excluded_nodes"] == ""


def test_int8_file_is_quantised_and_carries_fp32_metadata_and_settings(int8, fp32) -> None:
    import hashlib

    model = onnx.load(int8.path)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    data = Path(int8.path).read_bytes()
    assert int8.sha256 == hashlib.sha256(data).hexdigest() and int8.size_bytes == len(data)
    assert int8.fp32_sha256 == hashlib.sha256(fp32.read_bytes()).hexdigest()
    meta, fp32_meta = read_metadata(int8.path), read_metadata(fp32)
    assert fp32_meta.pop("precision") == "fp32"
    assert {k: meta[k] for k in fp32_meta} == fp32_meta  # classes, mean/std, source run ...
    assert meta["precision"] == "int8" and meta["source_run"] == "run-7"
    settings = json.loads(meta["quantization"])
    assert settings["activation_type"] == "uint8" and settings["weight_type"] == "int8"
    assert settings["per_channel"] is True and settings["format"] == "qdq"
    assert settings["calibration_classes"] == {str(c): 20 for c in range(10)}
    assert json.loads(meta["quantization_excluded"]) == []
    assert meta["cpu_flags"] == "avx2,avx512_vnni,avx512f"
    assert int8.warnings == []


@pytest.mark.parametrize("cfg", [
    QuantizeConfig(calibration_method="entropy"),
    QuantizeConfig(calibration_method="percentile", percentile=99.99),
    QuantizeConfig(format="qoperator", per_channel=False),
    QuantizeConfig(activation_type="int8", preprocess=False),
], ids=["entropy", "percentile", "qoperator-per-tensor", "s8s8-no-preprocess"])
def test_every_offered_setting_runs(cfg, fp32, calibration, test_split, tmp_path: Path) -> None:
    result = quantize_model(fp32, tmp_path / "q.onnx", calibration[0], cfg, features=VNNI)
    pixels = test_split[0]
    agree = (_logits(result.path, pixels).argmax(1) == _logits(fp32, pixels).argmax(1)).mean()
    assert agree >= 0.9
    assert result.fp32_accuracy is None and result.within_limit is None  # no evaluation given
    recorded = json.loads(result.metadata["quantization"])
    assert recorded["calibration_method"] == cfg.calibration_method


def test_resnet_with_residual_adds_quantises_close_to_fp32(tmp_path: Path) -> None:
    """resnet20 (random weights, 3x32x32): convs, residual Adds and the classifier are all
    quantised; logits stay close to FP32 on inputs other than the calibration ones."""
    torch.manual_seed(0)
    model = create_model("resnet20", 10, 3).eval()
    bundle = Bundle.from_model(model, arch="resnet20", classes=[str(i) for i in range(10)],
                               input_shape=(3, 32, 32), mean=[0.5] * 3, std=[0.25] * 3)
    fp32 = tmp_path / "resnet20.onnx"
    export_onnx(bundle, fp32, ExportConfig())
    rng = np.random.default_rng(0)
    calibration, pixels = (rng.random((n, 3, 32, 32), dtype=np.float32) for n in (64, 32))
    result = quantize_model(fp32, tmp_path / "q.onnx", calibration, QuantizeConfig(),
                            features=VNNI)
    graph = onnx.load(result.path).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fed_by_dq = {n.op_type for n in graph.node if dequantized & set(n.input)}
    assert {"Conv", "Add", "Gemm"} <= fed_by_dq
    assert _relative_error(result.path, fp32, pixels) < 0.05
    assert result.size_bytes < 0.5 * result.fp32_size_bytes  # INT8 weights


# ------------------------------------------------------------- accuracy control
def test_harmful_calibration_is_caught_and_controlled(fp32, calibration, test_split,
                                                      tmp_path: Path, caplog) -> None:
    """Calibrating on 20x too dark images (broken preprocessing) with per-tensor weights:
    the ranges are far too small, INT8 accuracy collapses, accuracy control measures each
    operator and keeps the worst ones in FP32 until the drop is within the limit."""
    dark = calibration[0][:16] * 0.05
    cfg = QuantizeConfig(per_channel=False, max_drop=0.01)
    evaluate = onnx_accuracy(*test_split)
    unchecked = quantize_model(fp32, tmp_path / "raw.onnx", dark, cfg.model_copy(
        update={"max_drop": None}), evaluate=evaluate, features=VNNI)
    assert unchecked.accuracy_drop > 0.3 and unchecked.within_limit is None  # gate's to catch
    with caplog.at_level(logging.INFO, logger="kdpipe.quantize"):
        result = quantize_model(fp32, tmp_path / "q.onnx", dark, cfg, evaluate=evaluate,
                                features=VNNI)
    assert result.int8_accuracy_before_control == pytest.approx(unchecked.int8_accuracy)
    assert result.control_steps and result.within_limit is True
    assert result.accuracy_drop <= 0.01
    errors = [e.relative_error for e in result.sensitivity]
    assert errors == sorted(errors, reverse=True) and all(e > 0 for e in errors)
    steps = result.control_steps
    assert [s.excluded for s in steps] == result.sensitivity[:len(steps)]
    excluded = json.loads(result.metadata["quantization_excluded"])
    assert [e["node"] for e in excluded] == result.excluded_nodes
    assert all(e["reason"].startswith("accuracy control") and e["relative_error"] > 0
               for e in excluded)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for step in result.control_steps:
        assert f"kept {step.excluded.node} ({step.excluded.op_type}" in logged
    assert "kept in FP32 by accuracy control" in result.describe()


def test_one_class_calibration_drops_accuracy_and_control_catches_it(
        fp32, calibration, int8, test_split, tmp_path: Path) -> None:
    """The issue's harmful setting: per-tensor weights calibrated on one image of one class.
    The worst class's drop is above the limit; accuracy control brings it back within."""
    pixels, labels = calibration
    evaluate, fp32_acc = onnx_accuracy(*test_split), int8.fp32_accuracy
    harmful = QuantizeConfig(per_channel=False, max_drop=None)
    results = {c: quantize_model(fp32, tmp_path / f"c{c}.onnx", pixels[labels == c][:1], harmful,
                                 evaluate=evaluate, fp32_accuracy=fp32_acc, features=VNNI)
               for c in range(10)}
    worst = max(results, key=lambda c: results[c].accuracy_drop)
    assert results[worst].accuracy_drop > 0.02 and results[worst].within_limit is None
    assert results[worst].settings.calibration_size == 1  # the sample used, not the config
    good, bad = (_relative_error(p, fp32, test_split[0]) for p in (int8.path, results[worst].path))
    assert bad > 1.5 * good  # logits further from FP32 than the balanced per-channel model's
    controlled = quantize_model(fp32, tmp_path / "q.onnx", pixels[labels == worst][:1],
                                harmful.model_copy(update={"max_drop": 0.01}), evaluate=evaluate,
                                fp32_accuracy=fp32_acc, features=VNNI)
    assert controlled.int8_accuracy_before_control == results[worst].int8_accuracy
    assert controlled.control_steps and controlled.within_limit is True
    assert controlled.accuracy_drop <= 0.01


def test_control_stops_when_nothing_is_left_to_exclude(fp32, calibration, tmp_path: Path,
                                                       caplog) -> None:
    """An evaluation no INT8 model can satisfy: every measured operator is kept in FP32,
    the result says it is still above the limit and the log warns (the gate decides)."""
    def evaluate(path: Path) -> float:  # the caller's accuracy: FP32 perfect, INT8 useless
        return 1.0 if Path(path) == fp32 else 0.0

    with caplog.at_level(logging.INFO, logger="kdpipe.quantize"):
        result = quantize_model(fp32, tmp_path / "q.onnx", calibration[0][:32],
                                QuantizeConfig(), evaluate=evaluate, features=VNNI)
    assert result.within_limit is False and result.accuracy_drop == 1.0
    assert len(result.control_steps) == len(result.sensitivity) >= 6  # 5 convs + classifier
    assert {s.excluded.op_type for s in result.control_steps} == {"Conv", "Gemm"}
    assert "nothing left to exclude" in result.describe()
    assert any(r.levelno == logging.WARNING and "nothing left to exclude" in r.getMessage()
               for r in caplog.records)
    assert type(result).model_validate_json(result.model_dump_json()) == result  # artifact


def test_configured_exclusions_are_kept_and_recorded(fp32, calibration, tmp_path: Path) -> None:
    conv = next(n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv")
    result = quantize_model(fp32, tmp_path / "q.onnx", calibration[0],
                            QuantizeConfig(nodes_to_exclude=(conv,), max_drop=None), features=VNNI)
    assert result.excluded_nodes == [conv]
    assert json.loads(result.metadata["quantization_excluded"]) == [
        {"node": conv, "reason": "quantize.nodes_to_exclude"}]
    with pytest.raises(QuantizeError, match=r"does not have: \['no_such_node'\]"):
        quantize_model(fp32, tmp_path / "x.onnx", calibration[0],
                       QuantizeConfig(nodes_to_exclude=("no_such_node",)), features=VNNI)


# --------------------------------------------------------------------- failures
@pytest.mark.parametrize("preprocess", [True, False])
def test_quantiser_failure_names_the_operator(fp32, calibration, tmp_path: Path,
                                              preprocess: bool, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model = onnx.load(str(fp32))
    first = model.graph.node[0]
    original = first.output[0]
    first.output[0] = f"{original}_before"
    model.graph.node.insert(1, helper.make_node("Mystery", [f"{original}_before"], [original],
                                                name="mystery_node", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    out = tmp_path / "q.onnx"
    with pytest.raises(QuantizeError, match=r"at Mystery \(node 'mystery_node'") as err:
        quantize_model(bad, out, calibration[0][:8], QuantizeConfig(preprocess=preprocess),
                       features=VNNI)
    assert "FP32 model is unaffected" in str(err.value) and not out.exists()
    assert list(cwd.iterdir()) == []  # ONNX Runtime's debug files stay in the temporary folder


def test_cpu_without_vnni_warns_once(fp32, calibration, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kdpipe.quantize"):
        result = quantize_model(fp32, tmp_path / "q.onnx", calibration[0][:32],
                                QuantizeConfig(), features=NO_VNNI)
    warned = [r for r in caplog.records if "VNNI" in r.getMessage()]
    assert len(warned) == 1 and result.warnings == [warned[0].getMessage()]
    assert result.settings.reduce_range is True
