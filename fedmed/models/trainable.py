"""What DP-SGD trains (dp_sgd.trainable) and what stays fixed at the starting weights.

DP-SGD's noise has norm σ·C·√d over d trained parameters while the clipped signal's is at most C, so
training fewer parameters from a good (public) start puts proportionally less noise on what is learnt
(De et al. 2022; Berrada et al. 2023). The choices:

- all: every parameter;
- norm: the normalization layers' scale and shift;
- head: a classifier's head (DenseNet's class_layers), a UNet's decoder (every up-sampling stage, the
  output layer included), SegResNet's up path and final convolution;
- adapters: every convolution's weight, through a low-rank adapter (fedmed.models.adapters) that is
  merged into it after each round; biases and normalization layers stay fixed.

What does not train is fixed exactly as model.freeze fixes it (fedmed.models.freeze): never trained,
never sent, the coordinator's values at every site. Under FedBN the site-local normalization layers train
whatever the choice (under DP-SGD too), since they never leave the site.
"""

from __future__ import annotations

from torch import nn

from fedmed.core.errors import ConfigError

from .adapters import adaptable_convolutions
from .prefixes import under_any
from .registry import NORM_MODULES, site_local_keys


def fixed_by_trainable(network: nn.Module, trainable: str, *, fedbn: bool = False) -> list[str]:
    """The parameters `trainable` leaves fixed, in parameter order; a ConfigError when it would train none. With
    `fedbn` the site-local normalization layers train whatever the choice: they never leave the site."""
    names = [name for name, _ in network.named_parameters()]
    if trainable == "all":
        return []
    if trainable == "norm":
        trained = set(_norm_parameters(network))
    elif trainable == "head":
        prefixes = head_prefixes(network)
        trained = {name for name in names if under_any(name, prefixes)}
    elif trainable == "adapters":
        trained = {f"{module_name}.weight" for module_name, _ in adaptable_convolutions(network)}
    else:
        raise ConfigError(f"dp_sgd.trainable '{trainable}' is not one of all, norm, head, adapters, auto")
    if not trained:
        raise ConfigError(
            f"dp_sgd.trainable = '{trainable}' leaves nothing to train in this network ({type(network).__name__}): "
            + _why_nothing(trainable)
        )
    local = set(site_local_keys(network)) if fedbn else set()
    return [name for name in names if name not in trained and name not in local]


def _norm_parameters(network: nn.Module) -> list[str]:
    return [
        f"{module_name}.{name}"
        for module_name, module in network.named_modules()
        if isinstance(module, NORM_MODULES)
        for name, _ in module.named_parameters(recurse=False)
    ]


def _why_nothing(trainable: str) -> str:
    if trainable == "norm":
        return "its normalization layers have no scale and shift; choose trainable = 'adapters' or 'head'"
    return "it has no convolution fedmed can adapt; choose trainable = 'head' or 'all'"


def head_prefixes(network: nn.Module) -> list[str]:
    """Module paths of the network's head: what trainable = 'head' trains."""
    from monai.networks.nets import DenseNet, SegResNet, UNet  # MONAI loads with the first network built

    for name, module in network.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, DenseNet):
            return [prefix + "class_layers"]
        if isinstance(module, SegResNet):
            return [prefix + part for part in ("up_layers", "up_samples", "conv_final")]
        if isinstance(module, UNet):
            return [prefix + path for path in _unet_decoder(module.model, path="model")]
    raise ConfigError(
        f"dp_sgd.trainable = 'head': fedmed does not know the head of {type(network).__name__}; choose 'adapters', "
        "'norm' or 'all'"
    )


def _unet_decoder(level: nn.Module, *, path: str) -> list[str]:
    """MONAI's UNet nests Sequential(down, SkipConnection(next level), up) down to its bottom layer: the ups."""
    if not isinstance(level, nn.Sequential) or len(level) != 3:
        return []
    inner = getattr(level[1], "submodule", None)
    deeper = _unet_decoder(inner, path=f"{path}.1.submodule") if inner is not None else []
    return [f"{path}.2", *deeper]
