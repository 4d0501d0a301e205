"""CIFAR-style ResNets (``resnet8`` .. ``resnet110``, ``resnet8x4``, ``resnet32x4``) and
Wide ResNets (``wrn_16_2``, ``wrn_40_2``).

Feature blocks a feature loss can hook: ``layer1`` (H), ``layer2`` (H/2), ``layer3``
(H/4; for WRNs before the final BN + ReLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.model_registry import MODELS, init_conv_bn

__all__ = ["BasicBlock", "CifarResNet", "WideBasicBlock", "WideResNet"]


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
        init_conv_bn(self)

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
        init_conv_bn(self)

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
