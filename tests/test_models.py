"""Model registry: every architecture runs forward/backward; building and loading checks."""

from __future__ import annotations

import sys
import types
import urllib.error

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdpipe.config import ModelConfig
from kdpipe.losses import FeatureHook
from kdpipe.metrics import count_params
from kdpipe.models import (
    WeightsUnavailableError,
    build_model,
    classifier_module,
    create_model,
    first_conv,
    list_models,
)
from kdpipe.registry import UnknownNameError

NUM_CLASSES = 7
# One representative per family runs in the quick suite; the deeper / wider variants
# take 2-8 s each on a shared 2-core CPU and are marked slow.
QUICK = {
    *list_models("cnn_*"),
    "resnet8",
    "resnet20",
    "resnet8x4",
    "wrn_16_2",
    "tv_resnet18",
    "tv_mobilenet_v3_small",
}


def _params(names: list[str]) -> list:
    return [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in names]


def test_registry_holds_the_documented_architectures():
    expected = {
        *(f"cnn_{s}" for s in ("tiny", "small", "medium", "large")),
        *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
        "resnet8x4",
        "resnet32x4",
        "wrn_16_2",
        "wrn_40_2",
        *(f"tv_{n}" for n in ("resnet18", "resnet34", "resnet50", "mobilenet_v2")),
        *(f"tv_{n}" for n in ("mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")),
    }
    assert set(list_models()) == expected
    assert list_models("cnn_*") == ["cnn_large", "cnn_medium", "cnn_small", "cnn_tiny"]


@pytest.mark.parametrize("arch", _params(list_models()))
def test_forward_backward_every_model(arch):
    torch.manual_seed(0)
    model = create_model(arch, NUM_CLASSES, in_channels=3)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, NUM_CLASSES)
    out.logsumexp(dim=1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{arch}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{arch}: {name} has a non-finite gradient"
    head = classifier_module(model)
    assert isinstance(head, nn.Linear) and head.out_features == NUM_CLASSES

    gray = create_model(arch, NUM_CLASSES, in_channels=1).eval()
    assert first_conv(gray)[1].in_channels == 1
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("arch", list_models("cnn_*") + ["resnet8", "resnet8x4", "wrn_16_2"])
@pytest.mark.parametrize("size", [8, 28])
def test_small_models_accept_digit_and_mnist_sizes(arch, size):
    model = create_model(arch, 10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


@pytest.mark.parametrize(
    ("arch", "path", "shape"),
    [
        ("cnn_small", "features.stage1", (2, 8, 28, 28)),
        ("cnn_small", "features.stage3", (2, 32, 7, 7)),
        ("cnn_large", "features.stage3", (2, 128, 7, 7)),
        ("resnet8", "layer3", (2, 64, 7, 7)),
        ("resnet8x4", "layer3", (2, 256, 7, 7)),
        ("wrn_16_2", "layer3", (2, 128, 7, 7)),
    ],
)
def test_documented_feature_paths(arch, path, shape):
    model = create_model(arch, 10, in_channels=1).eval()
    with FeatureHook(model, path) as hook, torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
        assert hook.output.shape == shape


def test_cnn_width_kwarg_and_default_pair_ratio():
    teacher, student = create_model("cnn_large", 10, 1), create_model("cnn_small", 10, 1)
    ratio = count_params(student) / count_params(teacher)
    assert ratio <= 0.1
    assert 200_000 <= count_params(teacher) <= 1_000_000
    assert 15_000 <= count_params(student) <= 40_000
    wide = create_model("cnn_small", 10, 1, width=16)
    assert count_params(wide) == count_params(create_model("cnn_medium", 10, 1))


def test_cifar_resnet_sizes_match_the_literature():
    # CRD's table: resnet20 0.27M, resnet56 0.86M, resnet8x4 1.2M, resnet32x4 7.4M (CIFAR-100).
    assert count_params(create_model("resnet20", 100)) == pytest.approx(0.278e6, rel=0.02)
    assert count_params(create_model("resnet56", 100)) == pytest.approx(0.861e6, rel=0.02)
    assert count_params(create_model("resnet8x4", 100)) == pytest.approx(1.23e6, rel=0.02)
    assert count_params(create_model("wrn_16_2", 100)) == pytest.approx(0.70e6, rel=0.02)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(
        UnknownNameError, match=r"unknown model 'resnet21'; valid names: .*resnet20"
    ):
        create_model("resnet21", 10)


def test_unknown_option_and_misplaced_weights_are_errors():
    with pytest.raises(ValueError, match=r"'resnet20' does not take option\(s\) \['width'\]"):
        create_model("resnet20", 10, width=8)
    with pytest.raises(ValueError, match=r"'cnn_small' has no pretrained weights.*tv_resnet18"):
        create_model("cnn_small", 10, weights="DEFAULT")


# ---------------------------------------------------------------- pretrained weights
@pytest.fixture
def fake_imagenet_weights(monkeypatch):
    """Serve a random 'pretrained' state dict instead of downloading one."""
    from torchvision.models import WeightsEnum, get_model_builder

    served: dict[str, dict[str, torch.Tensor]] = {}

    def fake_get_state_dict(self, *args, **kwargs):
        name = type(self).__name__.removesuffix("_Weights").lower()  # MobileNet_V2 -> mobilenet_v2
        torch.manual_seed(1)
        served[name] = get_model_builder(name)(weights=None).state_dict()
        return served[name]

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    return served


def test_pretrained_weights_are_loaded_and_adapted_to_one_channel(fake_imagenet_weights):
    model = create_model("tv_resnet18", 10, in_channels=1, weights="DEFAULT")
    rgb = fake_imagenet_weights["resnet18"]["conv1.weight"]
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(model.conv1.weight, rgb.sum(dim=1, keepdim=True))
    assert torch.equal(
        model.layer4[1].conv2.weight, fake_imagenet_weights["resnet18"]["layer4.1.conv2.weight"]
    )
    assert model.fc.out_features == 10
    # A gray image gives the RGB model's response to the same image in three channels.
    torch.manual_seed(0)
    rgb_model = create_model("tv_resnet18", 10, in_channels=3, weights="DEFAULT")
    rgb_model.fc = model.fc
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), rgb_model.eval()(x.expand(1, 3, 32, 32)), atol=1e-4)


def test_pretrained_mobilenet_classifier_resized(fake_imagenet_weights):
    model = create_model("tv_mobilenet_v2", 5, weights="IMAGENET1K_V1")
    assert classifier_module(model).out_features == 5
    assert torch.equal(
        model.features[0][0].weight, fake_imagenet_weights["mobilenet_v2"]["features.0.0.weight"]
    )


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


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K'.*IMAGENET1K_V1.*DEFAULT"):
        create_model("tv_resnet18", 10, weights="IMAGENET9K")


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


def test_checkpoint_bundle_directory_uses_load_bundle(tmp_path, monkeypatch):
    source = _trained_like("cnn_small", 10)
    calls = []

    def fake_load_bundle(path):
        calls.append(path)
        return source, types.SimpleNamespace(arch="cnn_small")

    fake = types.ModuleType("kdpipe.bundle")
    fake.load_bundle = fake_load_bundle
    monkeypatch.setitem(sys.modules, "kdpipe.bundle", fake)
    loaded = build_model(ModelConfig(arch="cnn_small", checkpoint=str(tmp_path)), 10, 1)
    assert calls == [tmp_path]
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_eval_outputs(loaded, x), _eval_outputs(source, x))
    with pytest.raises(
        ValueError, match=r"holds a 'cnn_small' model but model.arch is 'cnn_large'"
    ):
        build_model(ModelConfig(arch="cnn_large", checkpoint=str(tmp_path)), 10, 1)
