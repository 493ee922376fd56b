"""MONAI's UNet: the default segmentation network, and the body of the residual enhancer."""

from __future__ import annotations

from torch import nn

from fedmed.config import ModelConfig, TaskConfig
from fedmed.core.errors import ConfigError

from .common import ACTIVATION, construct, network, norm_layer


def unet(task: TaskConfig, model: ModelConfig, *, out_channels: int) -> nn.Module:
    # MONAI imports all of its submodules (seconds): loaded when a network is built, not with fedmed.models.
    from monai.networks.nets import UNet

    channels = model.channels or [16, 32, 64]
    strides = model.strides or [2] * (len(channels) - 1)
    if len(strides) != len(channels) - 1:
        raise ConfigError(f"model.strides needs len(channels) - 1 = {len(channels) - 1} entries, got {len(strides)}")
    divisor = 1
    for stride in strides:
        divisor *= stride
    # Scan geometry: RunConfig checks the patch size; sliding windows of that size cover any volume.
    if not task.scan_geometry and any(size % divisor for size in task.image_size):
        raise ConfigError(
            f"task.image_size {task.image_size} must be divisible by the UNet's total stride {divisor}; "
            f"change image_size or model.strides"
        )
    return construct(
        UNet,
        spatial_dims=task.spatial_dims,
        in_channels=task.channels,
        out_channels=out_channels,
        channels=channels,
        strides=strides,
        num_res_units=1 if model.num_res_units is None else model.num_res_units,
        norm=norm_layer(model.norm or "instance", channels=channels),
        act=ACTIVATION,
        dropout=model.dropout or 0.0,
    )


@network("unet", tasks={"segmentation"}, description="MONAI UNet, instance norm (default)")
def segmentation_unet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    return unet(task, model, out_channels=task.num_classes)
