"""Residual image-enhancement network: the UNet predicts a correction added to its input."""

from __future__ import annotations

import torch
from torch import nn


class ResidualEnhancer(nn.Module):
    """output = input + head(body(input)).

    The 1x1 head starts at zero so an untrained model is the identity: training begins at the
    degraded input's quality instead of below it.
    """

    def __init__(self, body: nn.Module, *, spatial_dims: int, body_channels: int, channels: int = 1) -> None:
        super().__init__()
        self.body = body
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.head = conv(body_channels, channels, kernel_size=1)  # one correction per input modality
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image + self.head(self.body(image))
