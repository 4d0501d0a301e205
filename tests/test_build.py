"""Building a model from its config: pretrained weights, start checkpoints and their errors."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdpipe.build import build_model
from kdpipe.bundle import Bundle, save_bundle
from kdpipe.config import ModelConfig
from kdpipe.models import WeightsUnavailableError, create_model


def test_offline_pretrained_weights_raise_a_clear_error(monkeypatch):
    from torchvision.models import WeightsEnum

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    cfg = ModelConfig(arch="tv_resnet18", weights="DEFAULT")
    with pytest.raises(
        WeightsUnavailableError, match=r"ResNet18_Weights\.IMAGENET1K_V1.*need a download"
    ) as err:
        build_model(cfg, num_classes=10, in_channels=3)
    assert "model.weights: null" in str(err.value)
    assert "name resolution" in str(err.value)


# ------------------------------------------------------------------------ checkpoints
def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _trained_like(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """A model whose BN statistics differ from a fresh one, so a failed load shows."""
    torch.manual_seed(3)
    model = create_model(arch, num_classes, 1, **kwargs)
    with torch.no_grad():
        model.train()(torch.randn(8, 1, 28, 28) * 2 + 1)
    return model


def test_build_model_safetensors_round_trip(tmp_path):
    source = _trained_like("cnn_small", 10)
    path = tmp_path / "student.safetensors"
    save_file(source.state_dict(), str(path))
    torch.manual_seed(99)  # a different random init, overwritten by the checkpoint
    loaded = build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(source, x))
    fresh = build_model(ModelConfig(arch="cnn_small"), 10, 1)
    assert not torch.allclose(_eval_outputs(fresh, x), _eval_outputs(source, x))


def test_build_model_pt_round_trip_with_wrapped_ddp_state_dict(tmp_path):
    source = _trained_like("resnet8", 10)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = build_model(ModelConfig(arch="resnet8", checkpoint=str(path)), 10, 1)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(source, x))


def test_pickled_objects_in_pt_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": create_model("cnn_tiny", 10, 1)}, path)  # a whole module: pickle
    with pytest.raises(ValueError, match=r"cannot be loaded with torch.load\(weights_only=True\)"):
        build_model(ModelConfig(arch="cnn_tiny", checkpoint=str(path)), 10, 1)


def test_checkpoint_with_other_class_count_names_both_numbers(tmp_path):
    path = tmp_path / "ten.safetensors"
    save_file(create_model("cnn_small", 10, 1).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"classifier for 10 classes .* num_classes=100"):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 100, 1)


def test_checkpoint_shape_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(create_model("cnn_small", 10, 1, width=16).state_dict(), str(path))
    pattern = r"'features\.stage1\.conv1\.conv\.weight': checkpoint shape \(16, 1, 3, 3\) vs model shape \(8, 1, 3, 3\)"
    with pytest.raises(ValueError, match=pattern):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)


def test_checkpoint_from_other_architecture_lists_keys(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(create_model("resnet8", 10, 1).state_dict(), str(path))
    with pytest.raises(
        ValueError, match=r"missing key\(s\) \['features\.stage1.*different architecture"
    ):
        build_model(ModelConfig(arch="cnn_small", checkpoint=str(path)), 10, 1)


def test_checkpoint_errors_for_missing_file_and_both_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="model checkpoint not found: .*nope.safetensors"):
        build_model(
            ModelConfig(arch="cnn_small", checkpoint=str(tmp_path / "nope.safetensors")), 10, 1
        )
    with pytest.raises(ValueError, match="sets both weights='DEFAULT' and checkpoint="):
        build_model(ModelConfig(arch="tv_resnet18", weights="DEFAULT", checkpoint="x.pt"), 10, 3)


def test_checkpoint_bundle_directory_is_loaded_with_its_arch_checked(tmp_path):
    source = _trained_like("cnn_small", 10)
    bundle = Bundle.from_model(
        source,
        arch="cnn_small",
        classes=[str(i) for i in range(10)],
        input_shape=(1, 28, 28),
        mean=(0.5,),
        std=(0.25,),
    )
    directory = save_bundle(bundle, tmp_path / "teacher")
    loaded = build_model(ModelConfig(arch="cnn_small", checkpoint=str(directory)), 10, 1)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(source, x))
    with pytest.raises(
        ValueError, match=r"holds a 'cnn_small' model but model.arch is 'cnn_large'"
    ):
        build_model(ModelConfig(arch="cnn_large", checkpoint=str(directory)), 10, 1)
