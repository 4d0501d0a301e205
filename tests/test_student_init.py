"""Students initialised from the teacher: teacher_pruned and teacher_layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kdpipe.bundle import Bundle, load_bundle, save_bundle
from kdpipe.config import StudentConfig
from kdpipe.configfile import parse_config
from kdpipe.metrics import count_macs, count_params
from kdpipe.models import create_model
from kdpipe.student_init import (
    block_selection,
    from_teacher_layers,
    layer_mapping_problem,
    prune_teacher_to,
)
from kdpipe.validate import find_problems


def test_block_selection_is_evenly_spaced_with_both_ends() -> None:
    assert block_selection(9, 3) == [0, 4, 8]  # resnet56 -> resnet20
    assert block_selection(18, 5) == [0, 4, 8, 13, 17]  # resnet110 -> resnet32
    assert block_selection(6, 2) == [0, 5]  # wrn_40_2 -> wrn_16_2
    assert block_selection(3, 1) == [0]


@pytest.mark.parametrize(("teacher_arch", "student_arch", "picked"), [
    ("resnet56", "resnet20", {1: 4, 2: 8}), ("wrn_40_2", "wrn_16_2", {1: 5})])
def test_teacher_layers_copies_stem_head_and_selected_blocks(
        teacher_arch: str, student_arch: str, picked: dict[int, int]) -> None:
    torch.manual_seed(0)
    teacher, student = create_model(teacher_arch, 10, 3), create_model(student_arch, 10, 3)
    with torch.no_grad():  # BN statistics that differ per block, so a wrong pick shows
        for i, m in enumerate(teacher.modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(float(i))
    from_teacher_layers(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["conv1.weight"], t["conv1.weight"])
    assert torch.equal(s["fc.weight"], t["fc.weight"]) and torch.equal(s["fc.bias"], t["fc.bias"])
    for j, i in picked.items():
        assert torch.equal(s[f"layer2.{j}.conv1.weight"], t[f"layer2.{i}.conv1.weight"])
        assert torch.equal(s[f"layer3.{j}.bn1.running_mean"], t[f"layer3.{i}.bn1.running_mean"])
    assert torch.equal(s["layer1.0.conv1.weight"], t["layer1.0.conv1.weight"])
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("teacher_arch", "student_arch", "expected"), [
    ("resnet20", "resnet56", "more blocks than the teacher in layer1, layer2, layer3"),
    ("resnet56", "resnet8x4", "a wider student, or another family"),
    ("resnet56", "wrn_16_2", "a wider student, or another family"),
    ("cnn_large", "cnn_small", "SmallCNN has no ResNet-style stages"),
])
def test_impossible_pairs_say_what_is_possible(teacher_arch: str, student_arch: str,
                                               expected: str) -> None:
    problem = layer_mapping_problem(create_model(teacher_arch, 10, 3),
                                    create_model(student_arch, 10, 3))
    assert problem is not None and expected in problem
    assert "resnet56 -> resnet20" in problem


def test_teacher_pruned_reaches_the_target_and_keeps_teacher_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 10, 1).eval()
    shape = (1, 28, 28)
    student, kept = prune_teacher_to(teacher, 0.3, "params", shape)
    assert kept == pytest.approx(0.3, rel=0.1)  # channel counts are integers: sizes step
    assert count_params(student) / count_params(teacher) == pytest.approx(kept)
    # Surviving filters are the teacher's own, not re-initialised ones.
    t_rows = teacher.features.stage1.conv1.conv.weight.detach().flatten(1)
    for row in student.features.stage1.conv1.conv.weight.detach().flatten(1):
        assert (t_rows == row).all(dim=1).any()
    # Recorded as the teacher's architecture plus the pruned layout: reloads identically.
    bundle = Bundle.from_model(student, arch="cnn_small", classes=[str(i) for i in range(10)],
                               input_shape=shape, mean=[0.5], std=[0.25])
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b"))
    x = torch.rand(3, *shape)
    with torch.no_grad():
        assert torch.equal(student(x), loaded.model(x))
    _, kept_macs = prune_teacher_to(teacher, 0.5, "macs", shape)
    assert kept_macs == pytest.approx(0.5, rel=0.1)
    assert count_macs(teacher, shape) > 0


def test_teacher_pruned_from_a_frozen_teacher_is_pruned_and_trainable() -> None:
    # A teacher that already taught (DistillationTask freezes it in place, as a second
    # distill_student call in one process sees it) must still be pruned, and the student
    # made from it must train: Torch-Pruning traces the graph through autograd.
    torch.manual_seed(0)
    teacher = create_model("cnn_small", 10, 1).eval().requires_grad_(False)
    student, kept = prune_teacher_to(teacher, 0.3, "params", (1, 28, 28))
    assert kept == pytest.approx(0.3, rel=0.1)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher stays frozen


def test_config_rules_for_student_init() -> None:
    with pytest.raises(ValidationError, match="init_target .* needed by, and only by"):
        StudentConfig(init="teacher_pruned")
    with pytest.raises(ValidationError, match="init_target .* needed by, and only by"):
        StudentConfig(init_target=0.2)
    with pytest.raises(ValidationError, match="less than 1"):
        StudentConfig(init="teacher_pruned", init_target=1.5)
    cfg = parse_config({"teacher": {"model": {"arch": "cnn_large"}},
                        "student": {"model": {"arch": "cnn_small"}, "init": "teacher_pruned",
                                    "init_target": 0.1}})
    (problem,) = find_problems(cfg)
    assert problem.path == "parameters.student.init"
    assert "set parameters.student.model.arch to 'cnn_large'" in problem.message
    cfg = parse_config({"teacher": {"model": {"arch": "resnet56"}},
                        "student": {"model": {"arch": "resnet8x4"}, "init": "teacher_layers"},
                        "prune": {"enabled": False}})
    (problem,) = find_problems(cfg)
    assert problem.path == "parameters.student.init" and "wider student" in problem.message
    ok = parse_config({"teacher": {"model": {"arch": "resnet56"}},
                       "student": {"model": {"arch": "resnet20"}, "init": "teacher_layers"},
                       "prune": {"enabled": False}})
    assert find_problems(ok) == []


@pytest.mark.slow
def test_distill_recipe_starts_from_the_pruned_teacher(tmp_path: Path) -> None:
    from kdpipe.config import DataConfig, DistillConfig, TrainConfig
    from kdpipe.data import build_dataset_spec
    from kdpipe.recipes import distill_student

    spec = build_dataset_spec(DataConfig(source="digits", batch_size=64))
    torch.manual_seed(0)
    teacher = Bundle.from_model(create_model("cnn_small", 10, 1).eval(), arch="cnn_small",
                                classes=spec.classes, input_shape=spec.input_shape,
                                mean=spec.mean, std=spec.std)
    cfg = StudentConfig(model={"arch": "cnn_small"}, init="teacher_pruned", init_target=0.3,
                        train=TrainConfig(epochs=1, device="cpu"))
    student = distill_student(spec, teacher, cfg, DistillConfig())
    init = student.spec.extra["init"]
    assert init["kind"] == "teacher_pruned" and init["kept"] == pytest.approx(0.3, rel=0.1)
    assert count_params(student.model) / count_params(teacher.model) == pytest.approx(init["kept"])
    assert student.spec.arch == "cnn_small" and student.spec.layout  # arch + pruned layout
    loaded = load_bundle(save_bundle(student, tmp_path / "s"))
    x = torch.rand(2, *spec.input_shape)
    with torch.no_grad():
        assert torch.equal(student.model.eval()(x), loaded.model(x))
