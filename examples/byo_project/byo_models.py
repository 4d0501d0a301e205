"""This project's own teacher network (kdpipe does not know it; the config names it).

``model.arch: "byo_models:DigitNet"`` in config.yaml points here. kdpipe imports this
file from the config's directory (or the working directory) without installing it,
passes ``num_classes`` and ``in_channels`` because ``__init__`` has parameters of those
names, and ``width`` from ``model.kwargs``.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class DigitNet(nn.Module):
    """Three conv blocks, global average pooling, one linear classifier."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(in_channels, width), _block(width, width),
                                  nn.MaxPool2d(2), _block(width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.body(x)), 1))
