"""A model from its config: architecture, then pretrained weights or a start checkpoint.

:func:`build_model` turns a :class:`~kdpipe.config.ModelConfig` into a module: it builds
the architecture with :func:`kdpipe.models.create_model` (torchvision weights included)
and loads ``model.checkpoint`` on top, from a ``.safetensors`` / ``.pt`` file or a kdpipe
bundle directory. It sits above both :mod:`kdpipe.models` and :mod:`kdpipe.bundle`, so
neither of those needs the other's loading code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdpipe.bundle import load_bundle
from kdpipe.model_registry import named_classifier
from kdpipe.models import create_model

if TYPE_CHECKING:
    from kdpipe.config import ModelConfig

__all__ = ["build_model", "load_checkpoint_state_dict", "load_state_dict_checked"]


def load_checkpoint_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read weights from a ``.safetensors`` / ``.pt`` / ``.pth`` file or a kdpipe bundle.

    ``.pt`` files are read with ``torch.load(weights_only=True)``: a plain state dict, or
    a dict holding one under ``state_dict`` or ``model``.

    Returns:
        The state dict, and the bundle's architecture name (``None`` for plain files).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model checkpoint not found: {p} (set model.checkpoint to an existing "
            ".safetensors/.pt file or kdpipe bundle directory)"
        )
    if p.is_dir():
        model, spec = load_bundle(p)
        return dict(model.state_dict()), spec.arch
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p)), None
    if p.suffix in {".pt", ".pth"}:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError and friends; re-raised with the fix
            raise ValueError(
                f"{p} cannot be loaded with torch.load(weights_only=True) ({err}); "
                "save a plain state_dict of tensors, or better a .safetensors file"
            ) from err
        for key in ("state_dict", "model"):
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
        if not isinstance(obj, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in obj.values()
        ):
            raise ValueError(f"{p} does not hold a state dict of tensors")
        return dict(obj), None
    raise ValueError(
        f"unsupported checkpoint {p}: use a .safetensors, .pt or .pth file or a bundle directory"
    )


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load ``state_dict`` into ``model`` strictly, with errors that say what differs.

    A ``module.`` prefix on every key (a DDP-wrapped model's state dict) is dropped.

    Raises:
        ValueError: the classifier's class count differs (naming both numbers), keys are
            missing or unexpected, or a tensor's shape differs (naming the first such key
            and both shapes).
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    head_name, head = named_classifier(model)
    head_key = f"{head_name}.weight"
    if head_key in sd and sd[head_key].shape[0] != head.out_features:
        raise ValueError(
            f"{source} has a classifier for {sd[head_key].shape[0]} classes but the model "
            f"was built for num_classes={head.out_features}; use a checkpoint trained on the "
            "same classes, or drop model.checkpoint"
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {type(model).__name__}: {len(missing)} missing key(s) "
            f"{missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}; was it saved "
            "from a different architecture?"
        )
    for key, tensor in expected.items():
        if sd[key].shape != tensor.shape:
            raise ValueError(
                f"{source} does not match the model at {key!r}: checkpoint shape "
                f"{tuple(sd[key].shape)} vs model shape {tuple(tensor.shape)} (different "
                "in_channels, kwargs or a pruned layout?)"
            )
    model.load_state_dict(sd, strict=True)


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model a :class:`~kdpipe.config.ModelConfig` describes.

    Applies ``cfg.weights`` (torchvision pretrained weights) or ``cfg.checkpoint`` (a
    ``.safetensors``/``.pt`` file or a kdpipe bundle directory) on top of
    :func:`create_model`.

    Raises:
        ValueError: both ``weights`` and ``checkpoint`` are set; the checkpoint belongs to
            another architecture or class count (both numbers named); shapes differ.
        WeightsUnavailableError: pretrained weights cannot be downloaded.
    """
    if cfg.weights is not None and cfg.checkpoint is not None:
        raise ValueError(
            f"model {cfg.arch!r} sets both weights={cfg.weights!r} and "
            f"checkpoint={cfg.checkpoint!r}; the checkpoint would overwrite the weights, "
            "so set only one"
        )
    model = create_model(cfg.arch, num_classes, in_channels, weights=cfg.weights, **cfg.kwargs)
    if cfg.checkpoint is not None:
        state_dict, bundle_arch = load_checkpoint_state_dict(cfg.checkpoint)
        if bundle_arch is not None and bundle_arch != cfg.arch:
            raise ValueError(
                f"checkpoint bundle {cfg.checkpoint} holds a {bundle_arch!r} model but "
                f"model.arch is {cfg.arch!r}; make them agree"
            )
        load_state_dict_checked(model, state_dict, source=f"checkpoint {cfg.checkpoint}")
    return model
