"""Architecture registry: small CNNs, CIFAR-style ResNets / WRNs and torchvision models.

Every architecture is a factory ``f(num_classes, in_channels=3, **kwargs) -> nn.Module``
registered in :data:`MODELS`; :func:`create_model` builds one by name and
:func:`build_model` builds one from a :class:`~kdpipe.config.ModelConfig`, applying
pretrained torchvision weights and/or a local checkpoint.

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
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.registry import Registry

if TYPE_CHECKING:
    from kdpipe.config import ModelConfig

__all__ = [
    "MODELS",
    "WeightsUnavailableError",
    "build_model",
    "classifier_module",
    "create_model",
    "first_conv",
    "list_models",
    "load_checkpoint_state_dict",
    "load_state_dict_checked",
    "nearest_module_paths",
]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable (offline)."""


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered architectures matching a shell-style pattern."""
    return MODELS.names(pattern)


# ------------------------------------------------------------------ small CNNs
def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(c_out),
            relu=nn.ReLU(),
        )
    )


def _init_conv_bn(model: nn.Module) -> None:
    """He init for convolutions (ReLU nets), identity affine for BN."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SmallCNN(nn.Module):
    """A VGG-style CNN with BatchNorm for MNIST-sized inputs.

    Three stages with ``width``, ``2*width`` and ``4*width`` channels. Stage 1 has one
    3x3 conv at full resolution (cheap, since it runs on the most pixels); stages 2 and 3
    start with a 2x2 max-pool and hold two convs each. Global average pooling makes the
    network resolution-agnostic.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input image channels.
        width: channels of stage 1 (the size knob: params grow ~ width^2).
        dropout: dropout before the classifier.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: int = 16, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1 (got {width})")
        w1, w2, w3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            OrderedDict(
                stage1=nn.Sequential(OrderedDict(conv1=_conv_bn_relu(in_channels, w1))),
                stage2=nn.Sequential(
                    OrderedDict(
                        pool=nn.MaxPool2d(2),
                        conv1=_conv_bn_relu(w1, w2),
                        conv2=_conv_bn_relu(w2, w2),
                    )
                ),
                stage3=nn.Sequential(
                    OrderedDict(
                        pool=nn.MaxPool2d(2),
                        conv1=_conv_bn_relu(w2, w3),
                        conv2=_conv_bn_relu(w3, w3),
                    )
                ),
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(w3, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


def _register_cnn(name: str, default_width: int) -> None:
    def factory(
        num_classes: int, in_channels: int = 3, *, width: int = default_width, dropout: float = 0.0
    ) -> nn.Module:
        return SmallCNN(num_classes, in_channels, width=width, dropout=dropout)

    factory.__name__ = name
    factory.__doc__ = f"{SmallCNN.__doc__.splitlines()[0]} Default width {default_width}."
    MODELS.register(name, factory)


# Widths double from one size to the next, so params grow ~4x: cnn_small has ~1/16 of
# cnn_large's parameters (the default student/teacher pair).
for _name, _width in (("cnn_tiny", 4), ("cnn_small", 8), ("cnn_medium", 16), ("cnn_large", 32)):
    _register_cnn(_name, _width)


# -------------------------------------------------------- CIFAR-style ResNets
class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity (or 1x1 conv + BN) shortcut (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 3-stage CIFAR ResNet with 6n+2 layers (He et al. 2016, section 4.2).

    Args:
        depth: 6n+2 (8, 14, 20, 32, 44, 56, 110).
        num_classes: outputs of the classifier.
        in_channels: input image channels.
        widths: (stem, stage1, stage2, stage3) channels; (16, 16, 32, 64) is the paper's,
            (32, 64, 128, 256) the "x4" variants used in the KD literature (CRD).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, int, int, int] = (16, 16, 32, 64),
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (got {depth})")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = self._stage(stem, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        _init_conv_bn(self)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(c_in, c_out, stride)]
        layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _register_resnet(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def factory(num_classes: int, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels, widths)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}, widths {widths}."
    MODELS.register(name, factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(f"resnet{_depth}", _depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _register_resnet(f"resnet{_depth}x4", _depth, (32, 64, 128, 256))


# ---------------------------------------------------------- Wide ResNets
class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 (Zagoruyko 2016).

    When the shape changes, the shortcut is a 1x1 conv applied to the pre-activated
    input, as in the reference implementation.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: 3 stages of (depth-4)/6 wide blocks with 16k, 32k, 64k channels.

    Args:
        depth: 6n+4 (16, 22, 28, 40...).
        widen: width multiplier k.
        num_classes: outputs of the classifier.
        in_channels: input image channels.
        dropout: dropout between the two convs of each block.
    """

    def __init__(
        self, depth: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (got {depth})")
        n = (depth - 4) // 6
        w1, w2, w3 = 16 * widen, 32 * widen, 64 * widen
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.layer1 = self._stage(16, w1, n, 1, dropout)
        self.layer2 = self._stage(w1, w2, n, 2, dropout)
        self.layer3 = self._stage(w2, w3, n, 2, dropout)
        self.bn = nn.BatchNorm2d(w3)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)
        _init_conv_bn(self)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [WideBasicBlock(c_in, c_out, stride, dropout)]
        layers += [WideBasicBlock(c_out, c_out, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int, in_channels: int = 3, *, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet 16-2 (~0.7M params)."""
    return WideResNet(16, 2, num_classes, in_channels, dropout)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int, in_channels: int = 3, *, dropout: float = 0.0) -> nn.Module:
    """Wide ResNet 40-2 (~2.2M params)."""
    return WideResNet(40, 2, num_classes, in_channels, dropout)


# ------------------------------------------------------- torchvision models
def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` of a model (its input layer) and its module path."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer")


def _named_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return found[-1]


def classifier_module(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last ``nn.Linear`` in module order."""
    return _named_classifier(model)[1]


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


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
    _replace_module(model, path, new)


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
        path, old = _named_classifier(model)
        if old.out_features != num_classes:
            _replace_module(model, path, nn.Linear(old.in_features, num_classes))
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


# ------------------------------------------------------------------- building
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
        arch: a name from :func:`list_models`.
        num_classes: outputs of the classifier.
        in_channels: input image channels (1 for grayscale).
        weights: pretrained torchvision weights (``tv_*`` models only), e.g. ``"DEFAULT"``.
        **kwargs: architecture options (e.g. ``width`` for the ``cnn_*`` models).

    Returns:
        The model, in training mode.

    Raises:
        UnknownNameError: ``arch`` is not registered (the message lists valid names).
        ValueError: bad sizes, or options the architecture does not take.
        WeightsUnavailableError: pretrained weights are needed but cannot be downloaded.
    """
    factory = MODELS.get(arch)
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes and in_channels must be >= 1 (got {num_classes}, {in_channels})"
        )
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
        from kdpipe.bundle import load_bundle  # lazy: bundle imports this module

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
    head_name, head = _named_classifier(model)
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
