"""A small trunk for the embedded data sets on the CPU."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv blocks + global average pooling, for small grey images (MNIST, digits).

    ``output_size`` = ``width * 4``. BatchNorm can be frozen by PML's
    ``freeze_trunk_batchnorm`` like any torchvision trunk. A
    :class:`~pml_plugins.models.backbones.MapTrunk`: ``feature_maps(x)`` returns the
    last block's maps, ``pool(maps)`` their global average.
    """

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width),
            nn.MaxPool2d(2),
            block(width, width * 2),
            nn.MaxPool2d(2),
            block(width * 2, width * 4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.output_size = width * 4

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's maps (B, output_size, H/4, W/4), before pooling."""
        return self.features[:-2](x)

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        return self.features[-2:](maps)

    def forward(self, x: torch.Tensor, pooled: bool = True) -> torch.Tensor:
        maps = self.feature_maps(x)
        return self.pool(maps) if pooled else maps
