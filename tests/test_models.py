"""Model registry: every architecture runs forward/backward; building and loading checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe.losses import FeatureHook
from kdpipe.metrics import count_params
from kdpipe.models import (
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


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET9K'.*IMAGENET1K_V1.*DEFAULT"):
        create_model("tv_resnet18", 10, weights="IMAGENET9K")
