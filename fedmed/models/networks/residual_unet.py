"""The residual enhancer for image enhancement: input + a MONAI UNet's correction (fedmed.models.enhancer)."""

from __future__ import annotations

from torch import nn

from fedmed.config import ModelConfig, TaskConfig

from ..enhancer import ResidualEnhancer
from .common import network
from .unet import unet


@network("residual-unet", tasks={"enhancement"}, description="input + MONAI UNet(input), instance norm (default)")
def residual_unet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    body_channels = (model.channels or [16])[0]
    return ResidualEnhancer(
        unet(task, model, out_channels=body_channels),
        spatial_dims=task.spatial_dims,
        body_channels=body_channels,
        channels=task.channels,
    )
