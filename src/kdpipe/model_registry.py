"""The :data:`MODELS` registry and the module-tree helpers every architecture family shares.

The architecture modules (:mod:`kdpipe.models_cnn`, :mod:`kdpipe.models_resnet`,
:mod:`kdpipe.models_tv`) register their factories here; :mod:`kdpipe.models` imports
them all and is the public face (``create_model``, ``list_models``). Keeping the registry
in this small module lets the architectures register without importing ``kdpipe.models``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdpipe.registry import Registry

__all__ = [
    "MODELS",
    "WeightsUnavailableError",
    "classifier_module",
    "first_conv",
    "init_conv_bn",
    "list_models",
    "named_classifier",
    "replace_module",
]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable (offline)."""


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered architectures matching a shell-style pattern."""
    return MODELS.names(pattern)


def init_conv_bn(model: nn.Module) -> None:
    """He init for convolutions (ReLU nets), identity affine for BN."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` of a model (its input layer) and its module path."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer")


def named_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` (its classifier) and its module path."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return found[-1]


def classifier_module(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last ``nn.Linear`` in module order."""
    return named_classifier(model)[1]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module ``path`` of ``model``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)
