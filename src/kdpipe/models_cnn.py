"""Small VGG-style CNNs (``cnn_tiny`` .. ``cnn_large``) for MNIST-sized inputs.

Feature blocks a feature loss can hook: ``features.stage1`` (H), ``features.stage2``
(H/2), ``features.stage3`` (H/4; the last feature map).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from kdpipe.model_registry import MODELS, init_conv_bn

__all__ = ["SmallCNN"]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(c_out),
            relu=nn.ReLU(),
        )
    )


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
        init_conv_bn(self)

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
