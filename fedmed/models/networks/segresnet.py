"""MONAI's SegResNet for segmentation."""

from __future__ import annotations

from torch import nn

from fedmed.config import ModelConfig, TaskConfig

from .common import ACTIVATION, construct, network, norm_layer


@network("segresnet", tasks={"segmentation"}, description="MONAI SegResNet, group norm")
def segresnet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    # MONAI imports all of its submodules (seconds): loaded when a network is built, not with fedmed.models.
    from monai.networks.nets import SegResNet

    init_filters = (model.channels or [8])[0]
    return construct(
        SegResNet,
        spatial_dims=task.spatial_dims,
        in_channels=task.channels,
        out_channels=task.num_classes,
        init_filters=init_filters,
        blocks_down=(1, 2, 2),
        blocks_up=(1, 1),
        norm=norm_layer(model.norm or "group", channels=[init_filters]),
        act=ACTIVATION,
        dropout_prob=model.dropout,
    )
