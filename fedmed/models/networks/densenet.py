"""MONAI's DenseNet for classification: a small one (the default) and the DenseNet121 layout."""

from __future__ import annotations

from torch import nn

from fedmed.config import ModelConfig, TaskConfig

from .common import construct, network, norm_layer


def densenet(task: TaskConfig, model: ModelConfig, *, small: bool) -> nn.Module:
    # MONAI imports all of its submodules (seconds): loaded when a network is built, not with fedmed.models.
    from monai.networks.nets import DenseNet

    init_features, growth_rate, blocks = (16, 8, (2, 4, 4)) if small else (64, 32, (6, 12, 24, 16))
    return construct(
        DenseNet,
        spatial_dims=task.spatial_dims,
        in_channels=task.channels,
        out_channels=task.num_classes,
        init_features=init_features,
        growth_rate=growth_rate,
        block_config=blocks,
        act=("relu", {"inplace": False}),
        norm=norm_layer(model.norm or "group", channels=[init_features, growth_rate]),
        dropout_prob=model.dropout or 0.0,
    )


@network(
    "densenet-small",
    tasks={"classification"},
    description="MONAI DenseNet, 3 small dense blocks, group norm (default)",
)
def densenet_small(task: TaskConfig, model: ModelConfig) -> nn.Module:
    return densenet(task, model, small=True)


@network(
    "densenet121",
    tasks={"classification"},
    description="MONAI DenseNet121 layout, group norm, random init (no download)",
)
def densenet121(task: TaskConfig, model: ModelConfig) -> nn.Module:
    return densenet(task, model, small=False)
