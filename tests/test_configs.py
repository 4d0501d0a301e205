"""Every shipped config parses with kdpipe's schema and with ZenML's run-configuration schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from kdpipe.config import PipelineConfig, TrainConfig
from kdpipe.configfile import load_config, read_yaml
from kdpipe.validate import find_problems

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
PIPELINE_STEPS = {"ingest_data", "finetune_teacher", "distill_student", "prune_student",
                  "export_onnx", "quantize_onnx", "evaluate_models", "gate_student",
                  "promote_student"}


def _distill_configs() -> list[Path]:
    return [p for p in CONFIGS if "parameters" in read_yaml(p) and p.stem != "predict"]


def test_the_expected_configs_are_shipped() -> None:
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "smoke.yaml", "cifar10.yaml", "cifar100.yaml",
            "imagefolder.yaml", "int8.yaml"} <= names


@pytest.mark.parametrize("path", _distill_configs(), ids=lambda p: p.name)
def test_kdpipe_parses_config(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert [str(p) for p in find_problems(cfg)] == []  # names, options, layer paths


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_zenml_accepts_run_configuration(path: Path) -> None:
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    raw = read_yaml(path)
    # ZenML ignores unknown top-level keys silently; a typo there must not ship.
    assert set(raw) <= set(PipelineRunConfiguration.model_fields), sorted(set(raw))
    run_config = PipelineRunConfiguration.model_validate(raw)
    assert run_config.enable_cache is None, "top-level enable_cache overrides every step"
    if path in _distill_configs():
        assert set(run_config.steps or {}) <= PIPELINE_STEPS


@pytest.mark.parametrize("path", _distill_configs(), ids=lambda p: p.name)
def test_distill_configs_name_a_zenml_model(path: Path) -> None:
    raw = read_yaml(path)
    assert raw.get("model", {}).get("name"), f"{path.name}: set model.name (Model Control Plane)"


def test_default_config_is_the_cpu_mnist_run() -> None:
    cfg = load_config(CONFIGS[0].parent / "default.yaml")
    assert cfg.data.source == "mnist5k"
    assert (cfg.teacher.model.arch, cfg.student.model.arch) == ("cnn_large", "cnn_medium")
    assert cfg.prune.enabled and cfg.data.download is False


def test_int8_config_gates_an_int8_resnet20_by_speed() -> None:
    cfg = load_config(CONFIGS[0].parent / "int8.yaml")
    assert cfg.quantize.enabled and cfg.student.model.arch == "resnet20"
    assert not cfg.prune.enabled  # the unpruned resnet20 is the shape INT8 is fast on
    assert (cfg.gate.prefer, cfg.gate.prefer_tolerance) == ("fastest", 0.003)
    assert 1 in cfg.evaluate.latency_batch_sizes and cfg.data.download is False
    assert not load_config(CONFIGS[0].parent / "default.yaml").quantize.enabled


def test_smoke_config_is_tiny() -> None:
    cfg = load_config(CONFIGS[0].parent / "smoke.yaml")
    assert cfg.data.source == "digits"
    assert cfg.teacher.train.epochs + cfg.student.train.epochs + cfg.prune.recovery.epochs <= 6


@pytest.mark.parametrize(("name", "teacher", "student", "source"), [
    ("cifar10.yaml", "resnet56", "resnet20", "torchvision:CIFAR10"),
    ("cifar100.yaml", "resnet32x4", "resnet8x4", "torchvision:CIFAR100"),
])
def test_cifar_configs_follow_the_published_recipe(name: str, teacher: str, student: str,
                                                   source: str) -> None:
    cfg = load_config(CONFIGS[0].parent / name)
    assert (cfg.teacher.model.arch, cfg.student.model.arch) == (teacher, student)
    assert cfg.data.source == source and cfg.data.download and cfg.data.augment
    assert cfg.data.batch_size == 64
    for train in (cfg.teacher.train, cfg.student.train):
        assert (train.optimizer, train.epochs, train.scheduler) == ("sgd", 240, "step")
        assert train.lr == pytest.approx(0.05, abs=1e-12)
        assert train.weight_decay == pytest.approx(5e-4, abs=1e-12)
        assert train.step_milestones == (150, 180, 210)
    assert (cfg.distill.temperature, cfg.distill.kd_weight) == (4.0, 0.9)


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    paths = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths |= _leaf_paths(ann, f"{prefix}{name}.")
        else:
            paths.add(f"{prefix}{name}")
    return paths


def _present_paths(data: Any, prefix: str = "") -> set[str]:
    if not isinstance(data, dict):
        return {prefix.rstrip(".")}
    paths = set()
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "kwargs":  # {} is a leaf (key_map)
            paths |= _present_paths(value, f"{prefix}{key}.")
        else:
            paths.add(f"{prefix}{key}")
    return paths


def test_imagefolder_config_documents_every_key() -> None:
    path = CONFIGS[0].parent / "imagefolder.yaml"
    present = _present_paths(read_yaml(path)["parameters"])
    # One full TrainConfig (teacher.train) documents those keys for student.train and
    # prune.recovery, which only list what they change.
    train_keys = {f"{sub}.{k}" for sub in ("student.train", "prune.recovery")
                  for k in TrainConfig.model_fields}
    predict_only = {"predict"}  # configs/predict.yaml's section, not the distillation run's
    missing = sorted(_leaf_paths(PipelineConfig) - present - train_keys - predict_only)
    assert not missing, f"imagefolder.yaml does not document: {missing}"
