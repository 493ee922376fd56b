"""The network registry and what every network shares: DP-compatible normalization and activations.

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
from fedmed.core.registry import Registry

NetworkBuilder = Callable[[TaskConfig, ModelConfig], nn.Module]
ACTIVATION = ("leakyrelu", {"negative_slope": 0.1, "inplace": False})


@dataclass(frozen=True)
class NetworkEntry:
    tasks: frozenset[str]
    build: NetworkBuilder
    description: str


NETWORKS = Registry[NetworkEntry]("network", field="model.name")


def network(name: str, *, tasks: Iterable[str], description: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Decorator: register the decorated builder in NETWORKS as `name`, for the task kinds in `tasks`."""

    def add(build: NetworkBuilder) -> NetworkBuilder:
        NETWORKS.register(name)(NetworkEntry(frozenset(tasks), build, description))
        return build

    return add


def norm_layer(name: str, *, channels: list[int] | None = None) -> tuple[str, dict]:
    """MONAI's norm argument for model.norm; group norm takes 8 groups where every channel count allows."""
    if name == "instance":
        return ("instance", {"affine": True})
    if name == "group":
        groups = 8 if channels and all(c % 8 == 0 for c in channels) else 4
        if channels and any(c % groups for c in channels):
            raise ConfigError(f"model.norm = 'group' needs channel counts divisible by 4; got {channels}")
        return ("group", {"num_groups": groups})
    return ("batch", {})


def construct(cls: type[nn.Module], **arguments: object) -> nn.Module:
    """Build a MONAI network and keep its constructor call (MONAI's ConfigParser form), which an exported
    bundle's `network_def` repeats."""
    network = cls(**arguments)
    network.constructor_config = {"_target_": f"{cls.__module__}.{cls.__name__}", **arguments}  # type: ignore[assignment]
    return network
