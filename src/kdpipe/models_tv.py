"""torchvision classifiers (``tv_resnet18``, ``tv_mobilenet_v2``, ...), optionally with
pretrained ImageNet weights, adapted to any class count and input channel count.

torchvision is imported inside the functions: ``import kdpipe.models`` stays cheap and
works where only the CNNs and ResNets are needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kdpipe.model_registry import (
    MODELS,
    WeightsUnavailableError,
    first_conv,
    named_classifier,
    replace_module,
)

__all__: list[str] = []


def _adapt_input_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Swap the first conv for one taking ``in_channels`` inputs.

    With pretrained RGB filters, 1 channel gets the sum of the RGB filters (a gray image
    then gives the response the RGB model gives to the same gray image in colour). Other
    channel counts get the mean filter repeated and scaled by 3/in_channels, which keeps
    that property for any number of equal channels.
    """
    path, old = first_conv(model)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        if pretrained:
            if in_channels == 1:
                new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
            else:
                mean = old.weight.mean(dim=1, keepdim=True)
                new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3.0 / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
        else:
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
            if new.bias is not None:
                nn.init.zeros_(new.bias)
    replace_module(model, path, new)


def _pretrained_state_dict(tv_name: str, weights: str) -> dict[str, torch.Tensor]:
    """Fetch torchvision weights (from torch.hub's cache, else the internet)."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(tv_name)
    if weights not in enum.__members__:
        raise ValueError(
            f"unknown weights {weights!r} for torchvision {tv_name}; "
            f"valid: {', '.join(enum.__members__)}"
        )
    chosen = enum[weights]
    try:
        return chosen.get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # URLError, socket errors, ... are all OSError
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            f"pretrained weights {enum.__name__}.{chosen.name} for {tv_name} need a download "
            f"from {chosen.url}, which failed ({err}). Fix: run once with internet access "
            f"(the file is then cached in {hub_dir}), or copy the file there by hand, or "
            "set model.weights: null to start from random weights (or model.checkpoint to "
            "a local file)."
        ) from err


def pretrained_file(arch: str, weights: str) -> tuple[str, Path]:
    """Where pretrained ``weights`` of registered ``arch`` (``tv_*``) come from and are cached.

    Returns the download URL and the file in torch.hub's cache that holds it once fetched.

    Raises:
        ValueError: ``weights`` is not a name of the architecture's torchvision weights.
    """
    import torchvision.models as tvm

    tv_name = arch.removeprefix("tv_")
    enum = tvm.get_model_weights(tv_name)
    if weights not in enum.__members__:
        raise ValueError(f"unknown weights {weights!r} for {arch}; valid: "
                         f"{', '.join(enum.__members__)}")
    url = enum[weights].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _torchvision_model(
    tv_name: str, num_classes: int, in_channels: int, weights: str | None
) -> nn.Module:
    import torchvision.models as tvm

    builder = tvm.get_model_builder(tv_name)
    if weights is None:
        model = builder(weights=None, num_classes=num_classes)
    else:
        # Build the ImageNet head the weights were trained with, then swap it.
        model = builder(weights=None)
        model.load_state_dict(_pretrained_state_dict(tv_name, weights))
        path, old = named_classifier(model)
        if old.out_features != num_classes:
            replace_module(model, path, nn.Linear(old.in_features, num_classes))
    _adapt_input_conv(model, in_channels, pretrained=weights is not None)
    return model


def _register_torchvision(tv_name: str) -> None:
    def factory(num_classes: int, in_channels: int = 3, *, weights: str | None = None) -> nn.Module:
        return _torchvision_model(tv_name, num_classes, in_channels, weights)

    factory.__name__ = f"tv_{tv_name}"
    factory.__doc__ = (
        f"torchvision {tv_name}; ``weights`` names its pretrained weights (e.g. DEFAULT)."
    )
    MODELS.register(f"tv_{tv_name}", factory)


for _tv in (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
):
    _register_torchvision(_tv)
