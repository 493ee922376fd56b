"""Build the network `model.name` names (from the NETWORKS registry, fedmed.models.networks) for a task, and
tell which of its parameters are normalization layers (site-local under FedBN)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fedmed.config import ModelConfig, TaskConfig
from fedmed.core.errors import ConfigError

from .networks import NETWORKS

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
DEFAULTS = {"segmentation": "unet", "classification": "densenet-small", "enhancement": "residual-unet"}
MODEL_NAMES = NETWORKS.names()


def build_model(task: TaskConfig, model: ModelConfig) -> nn.Module:
    """Build the configured network for the task (random init from the current torch seed)."""
    name = DEFAULTS[task.kind] if model.name == "default" else model.name
    entry = NETWORKS.get(name)
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
