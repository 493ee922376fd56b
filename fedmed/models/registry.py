"""Model registry: name -> MONAI network built with DP-compatible normalization.

Default networks use instance or group normalization with affine parameters: Opacus cannot
handle BatchNorm, and FedBN needs normalization parameters to keep site-local.
Activations are never in-place because Opacus' per-sample gradient hooks need the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from fedmed.config import ModelConfig, TaskConfig
from fedmed.core.errors import ConfigError

NORM_MODULES = (
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
ACTIVATION = ("leakyrelu", {"negative_slope": 0.1, "inplace": False})


@dataclass(frozen=True)
class ModelEntry:
    tasks: frozenset[str]
    build: Callable[[TaskConfig, ModelConfig], nn.Module]
    description: str


def _norm(name: str, *, channels: list[int] | None = None) -> tuple[str, dict]:
    if name == "instance":
        return ("instance", {"affine": True})
    if name == "group":
        groups = 8 if channels and all(c % 8 == 0 for c in channels) else 4
        if channels and any(c % groups for c in channels):
            raise ConfigError(f"model.norm = 'group' needs channel counts divisible by 4; got {channels}")
        return ("group", {"num_groups": groups})
    return ("batch", {})


def _unet(task: TaskConfig, model: ModelConfig, *, out_channels: int) -> nn.Module:
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
    return _construct(
        UNet,
        spatial_dims=task.spatial_dims,
        in_channels=task.channels,
        out_channels=out_channels,
        channels=channels,
        strides=strides,
        num_res_units=1 if model.num_res_units is None else model.num_res_units,
        norm=_norm(model.norm or "instance", channels=channels),
        act=ACTIVATION,
        dropout=model.dropout or 0.0,
    )


def _construct(cls: type[nn.Module], **arguments: object) -> nn.Module:
    """Build a MONAI network and keep its constructor call (MONAI's ConfigParser form), which an exported
    bundle's `network_def` repeats."""
    network = cls(**arguments)
    network.constructor_config = {"_target_": f"{cls.__module__}.{cls.__name__}", **arguments}  # type: ignore[assignment]
    return network


def _segmentation_unet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    return _unet(task, model, out_channels=task.num_classes)


def _segresnet(task: TaskConfig, model: ModelConfig) -> nn.Module:
    from monai.networks.nets import SegResNet

    init_filters = (model.channels or [8])[0]
    return _construct(
        SegResNet,
        spatial_dims=task.spatial_dims,
        in_channels=task.channels,
        out_channels=task.num_classes,
        init_filters=init_filters,
        blocks_down=(1, 2, 2),
        blocks_up=(1, 1),
        norm=_norm(model.norm or "group", channels=[init_filters]),
        act=ACTIVATION,
        dropout_prob=model.dropout,
    )


def _densenet(task: TaskConfig, model: ModelConfig, *, small: bool) -> nn.Module:
    from monai.networks.nets import DenseNet

    init_features, growth_rate, blocks = (16, 8, (2, 4, 4)) if small else (64, 32, (6, 12, 24, 16))
    return _construct(
        DenseNet,
        spatial_dims=task.spatial_dims,
        in_channels=task.channels,
        out_channels=task.num_classes,
        init_features=init_features,
        growth_rate=growth_rate,
        block_config=blocks,
        act=("relu", {"inplace": False}),
        norm=_norm(model.norm or "group", channels=[init_features, growth_rate]),
        dropout_prob=model.dropout or 0.0,
    )


def _residual_enhancer(task: TaskConfig, model: ModelConfig) -> nn.Module:
    from .enhancer import ResidualEnhancer

    body_channels = (model.channels or [16])[0]
    return ResidualEnhancer(
        _unet(task, model, out_channels=body_channels),
        spatial_dims=task.spatial_dims,
        body_channels=body_channels,
        channels=task.channels,
    )


REGISTRY: dict[str, ModelEntry] = {
    "unet": ModelEntry(frozenset({"segmentation"}), _segmentation_unet, "MONAI UNet, instance norm (default)"),
    "segresnet": ModelEntry(frozenset({"segmentation"}), _segresnet, "MONAI SegResNet, group norm"),
    "densenet-small": ModelEntry(
        frozenset({"classification"}),
        lambda task, model: _densenet(task, model, small=True),
        "MONAI DenseNet, 3 small dense blocks, group norm (default)",
    ),
    "densenet121": ModelEntry(
        frozenset({"classification"}),
        lambda task, model: _densenet(task, model, small=False),
        "MONAI DenseNet121 layout, group norm, random init (no download)",
    ),
    "residual-unet": ModelEntry(
        frozenset({"enhancement"}), _residual_enhancer, "input + MONAI UNet(input), instance norm (default)"
    ),
}
DEFAULTS = {"segmentation": "unet", "classification": "densenet-small", "enhancement": "residual-unet"}
MODEL_NAMES = sorted(REGISTRY)


def build_model(task: TaskConfig, model: ModelConfig) -> nn.Module:
    """Build the configured network for the task (random init from the current torch seed)."""
    name = DEFAULTS[task.kind] if model.name == "default" else model.name
    entry = REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"model.name '{name}' is not registered; choose one of {', '.join(MODEL_NAMES)}")
    if task.kind not in entry.tasks:
        raise ConfigError(
            f"model.name '{name}' is for {', '.join(sorted(entry.tasks))}, not {task.kind}; "
            f"use '{DEFAULTS[task.kind]}' or leave model.name unset"
        )
    return entry.build(task, model)


def site_local_keys(model: nn.Module) -> list[str]:
    """State-dict keys of normalization layers: under FedBN these stay at the site."""
    keys: list[str] = []
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_MODULES):
            prefix = f"{module_name}." if module_name else ""
            keys += [prefix + name for name, _ in module.named_parameters(recurse=False)]
            keys += [prefix + name for name, _ in module.named_buffers(recurse=False)]
    return keys


def shared_keys(all_keys: Iterable[str], local_keys: Iterable[str]) -> list[str]:
    """Keys that are sent and aggregated (all but the site-local ones), in state-dict order."""
    local = set(local_keys)
    return [key for key in all_keys if key not in local]
