"""Architecture registry: small CNNs, CIFAR-style ResNets / WRNs and torchvision models.

Every architecture is a factory ``f(num_classes, in_channels=3, **kwargs) -> nn.Module``
registered in :data:`MODELS` (by :mod:`kdpipe.models_cnn`, :mod:`kdpipe.models_resnet`
and :mod:`kdpipe.models_tv`, which this module imports); :func:`create_model` builds one
by name, or the user's own class / factory by import path (``"my_models:TinyNet"``,
:mod:`kdpipe.user_code`). :func:`kdpipe.build.build_model` builds one from a
:class:`~kdpipe.config.ModelConfig`, applying pretrained weights or a local checkpoint.

All models end in global adaptive average pooling followed by one ``nn.Linear``
(reachable through :func:`classifier_module`), so they accept any input of 8x8 pixels
or more (digits 8x8, MNIST 28x28, CIFAR 32x32).

Module paths that feature losses (FitNets, attention transfer) can hook:

==================  ==========================================================
family              feature blocks (output of each, in forward order)
==================  ==========================================================
``cnn_*``           ``features.stage1`` (H), ``features.stage2`` (H/2),
                    ``features.stage3`` (H/4; the last feature map)
``resnet*``         ``layer1`` (H), ``layer2`` (H/2), ``layer3`` (H/4)
``wrn_*``           ``layer1`` (H), ``layer2`` (H/2), ``layer3`` (H/4; before
                    the final BN + ReLU)
``tv_*``            torchvision's own names (``layer4`` for ResNets,
                    ``features`` for MobileNets / EfficientNet)
==================  ==========================================================

Our own models never use in-place activations, so a captured feature map is not
overwritten later in the forward pass.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

# Imported for their side effect: each registers its architectures in MODELS.
from kdpipe import models_cnn, models_resnet, models_tv, user_code  # noqa: F401
from kdpipe.model_registry import (
    MODELS,
    WeightsUnavailableError,
    classifier_module,
    first_conv,
    list_models,
)

__all__ = [
    "MODELS",
    "WeightsUnavailableError",
    "classifier_module",
    "create_model",
    "first_conv",
    "list_models",
    "nearest_module_paths",
]


def create_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    *,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered architecture.

    Args:
        arch: a name from :func:`list_models`, or an import path ``"package.module:callable"``
            to the user's own class or factory (:mod:`kdpipe.user_code`: called with
            ``kwargs``, plus ``num_classes`` / ``in_channels`` where its signature has them;
            its classifier must have ``num_classes`` outputs).
        num_classes: outputs of the classifier.
        in_channels: input image channels (1 for grayscale).
        weights: pretrained torchvision weights (``tv_*`` models only), e.g. ``"DEFAULT"``.
        **kwargs: architecture options (e.g. ``width`` for the ``cnn_*`` models).

    Returns:
        The model, in training mode.

    Raises:
        UnknownNameError: ``arch`` is not registered (the message lists valid names).
        UserCodeError: an import path that does not resolve, or builds no fitting model.
        ValueError: bad sizes, or options the architecture does not take.
        WeightsUnavailableError: pretrained weights are needed but cannot be downloaded.
    """
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes and in_channels must be >= 1 (got {num_classes}, {in_channels})"
        )
    if user_code.is_import_path(arch):
        if weights is not None:
            raise ValueError(f"model {arch!r} is your own code and has no pretrained weights "
                             f"(got weights={weights!r}); use model.checkpoint for local weights")
        return user_code.build(arch, num_classes, in_channels, kwargs)
    factory = MODELS.get(arch)
    accepted = [
        p.name for p in inspect.signature(factory).parameters.values() if p.kind == p.KEYWORD_ONLY
    ]
    if weights is not None:
        if "weights" not in accepted:
            raise ValueError(
                f"model {arch!r} has no pretrained weights (got weights={weights!r}); "
                f"use one of {', '.join(list_models('tv_*'))}, or model.checkpoint for "
                "local weights"
            )
        kwargs["weights"] = weights
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        allowed = [a for a in accepted if a != "weights"]
        raise ValueError(
            f"model {arch!r} does not take option(s) {unknown}; "
            f"it accepts: {allowed or 'no options'}"
        )
    return factory(num_classes, in_channels, **kwargs)


def nearest_module_paths(model: nn.Module, path: str, limit: int = 8) -> list[str]:
    """Module paths of ``model`` that look like ``path`` (for "did you mean" errors)."""
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(path, names, n=limit, cutoff=0.5)
    if close:
        return close
    # Nothing similar: show the children of the deepest prefix of ``path`` that exists.
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix == "" or prefix in names:
            depth = prefix.count(".") + 1 if prefix else 0
            under = f"{prefix}." if prefix else ""
            return [n for n in names if n.startswith(under) and n.count(".") == depth][:limit]
    return names[:limit]
