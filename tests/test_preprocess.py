"""Per-model preprocessing: the loader's dataset-normalised batch → what a model expects."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdpipe.config import ModelConfig, Preprocessing
from kdpipe.preprocess import InputTransform, Preprocessed, adapted_model, model_input_shape

DS_MEAN, DS_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _normalised(raw: torch.Tensor) -> torch.Tensor:
    """What the loader hands a model: raw [0, 1] pixels normalised with the dataset's stats."""
    m, s = torch.tensor(DS_MEAN).view(1, 3, 1, 1), torch.tensor(DS_STD).view(1, 3, 1, 1)
    return (raw - m) / s


def test_nothing_declared_is_the_identity() -> None:
    x = torch.randn(2, 3, 4, 5)
    t = InputTransform(None, DS_MEAN, DS_STD)
    assert t.is_identity
    assert torch.equal(t(x), x)
    # value_range 255 without mean/std: the dataset's stats scaled by 255, i.e. the same tensor.
    t255 = InputTransform(Preprocessing(value_range=255), DS_MEAN, DS_STD)
    assert t255.is_identity


def test_caffe_style_bgr_255_nhwc_matches_the_formula() -> None:
    raw = torch.rand(2, 3, 4, 5)
    p = Preprocessing(mean=(103.5, 116.0, 123.5), std=(57.0, 57.5, 58.0), value_range=255,
                      channel_order="BGR", layout="NHWC")
    got = InputTransform(p, DS_MEAN, DS_STD)(_normalised(raw))
    bgr = (raw * 255).flip(1)
    want = ((bgr - torch.tensor(p.mean).view(1, 3, 1, 1))
            / torch.tensor(p.std).view(1, 3, 1, 1)).permute(0, 2, 3, 1)
    assert got.shape == (2, 4, 5, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_unit_range_without_normalisation_gives_raw_pixels() -> None:
    raw = torch.rand(3, 3, 2, 2)
    p = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.testing.assert_close(InputTransform(p, DS_MEAN, DS_STD)(_normalised(raw)), raw,
                               rtol=0, atol=1e-6)


def test_model_input_shape_follows_the_layout() -> None:
    assert model_input_shape(None, (3, 32, 28)) == (3, 32, 28)
    assert model_input_shape(Preprocessing(layout="NHWC"), (3, 32, 28)) == (32, 28, 3)


def test_bad_declarations_are_errors() -> None:
    with pytest.raises(ValueError, match="BGR needs 3-channel"):
        InputTransform(Preprocessing(channel_order="BGR"), (0.5,), (0.2,))
    with pytest.raises(ValueError, match="2 entries but the data has 3"):
        InputTransform(Preprocessing(mean=(0.0, 0.0), std=(1.0, 1.0)), DS_MEAN, DS_STD)
    with pytest.raises(ValidationError, match="give preprocessing.mean and std"):
        Preprocessing(mean=(0.5,))
    with pytest.raises(ValidationError, match="one value per channel"):
        Preprocessing(mean=(0.5, 0.5), std=(0.2,))
    with pytest.raises(ValidationError, match="greater than 0"):
        Preprocessing(mean=(0.5,), std=(0.0,))
    with pytest.raises(ValidationError, match="value_range"):
        ModelConfig(arch="cnn_tiny", preprocessing={"value_range": 100})


def test_preprocessed_keeps_the_models_state_and_adapted_model_wraps_only_when_declared() -> None:
    from types import SimpleNamespace

    model = nn.Conv2d(3, 2, 1)
    p = Preprocessing(layout="NCHW", channel_order="BGR")
    wrapped = Preprocessed(model, InputTransform(p, DS_MEAN, DS_STD))
    assert set(wrapped.state_dict()) == {"model.weight", "model.bias"}  # no transform state
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(wrapped(x), model(x.flip(1)))
    spec = SimpleNamespace(mean=DS_MEAN, std=DS_STD, extra={})
    assert adapted_model(SimpleNamespace(model=model, spec=spec)) is model
    spec.extra = {"preprocessing": p.model_dump(mode="json")}
    assert isinstance(adapted_model(SimpleNamespace(model=model, spec=spec)), Preprocessed)


def test_a_pytorch_teacher_with_declared_preprocessing_trains_and_teaches_behind_it() -> None:
    """The teacher trains on its declared input; its bundle records it; distillation and
    the measured metrics go through the same transform."""
    from kdpipe import recipes
    from kdpipe.config import (
        DataConfig,
        DistillConfig,
        PipelineConfig,
        StudentConfig,
        TeacherConfig,
        TrainConfig,
    )
    from kdpipe.data import build_dataset_spec, make_loader
    from kdpipe.train import evaluate
    from kdpipe.validate import find_problems

    ds = build_dataset_spec(DataConfig(source="digits", batch_size=64))
    raw255 = Preprocessing(mean=(0.0,), std=(1.0,), value_range=255)
    fast = TrainConfig(epochs=1, lr=0.01, scheduler="none", device="cpu")
    teacher = recipes.train_teacher(ds, TeacherConfig(
        model=ModelConfig(arch="cnn_tiny", preprocessing=raw255), train=fast))
    assert teacher.spec.extra["preprocessing"] == raw255.model_dump(mode="json")
    net = adapted_model(teacher)
    assert isinstance(net, Preprocessed)
    x, _, _ = next(iter(make_loader(ds, "test", train=False)))
    raw = x * ds.std[0] + ds.mean[0]
    torch.testing.assert_close(net.transform(x), raw * 255, rtol=1e-5, atol=1e-3)
    test_acc = evaluate(net, make_loader(ds, "test", train=False)).accuracy
    assert abs(teacher.spec.extra["metrics"]["test_accuracy"] - test_acc) < 1e-9
    student = recipes.distill_student(ds, teacher, StudentConfig(
        model=ModelConfig(arch="cnn_tiny"), train=fast), DistillConfig())
    assert student.spec.extra["metrics"]["test_accuracy"] > 0.1  # 10 classes: above chance
    ddp = PipelineConfig(teacher=TeacherConfig(model=ModelConfig(arch="cnn_tiny",
                                                                 preprocessing=raw255)),
                         student=StudentConfig(train=TrainConfig(num_processes=2, device="cpu")))
    assert [p.path for p in find_problems(ddp)] == ["parameters.student.train.num_processes"]
