"""A memory estimate for training, from the config alone, so an absurd size is refused before any data loads.

The estimate is deliberately simple and errs high:
    bytes = 4 x parameters x 4                      (weights, gradients, two Adam moments; float32)
          + 2 x batch_size x activations_per_case   (every layer's output is kept for the backward pass,
                                                     and the backward pass needs about as much again)
where activations_per_case is the sum of the element counts of every layer's output for one input of
`task.image_size`, measured by running the network on PyTorch's "meta" device (shapes only, nothing is
allocated), times 4 bytes. It is compared with the memory training would use: the GPU's free memory when
training runs on CUDA, otherwise MemAvailable from /proc/meminfo (no limit is applied where neither is known).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedmed.config import RunConfig
from fedmed.core.errors import ConfigError
from fedmed.core.log import logger

from .registry import build_model

FLOAT_BYTES = 4
OPTIMIZER_COPIES = 4  # weights, gradients and Adam's two moments
BACKWARD_FACTOR = 2  # stored activations plus their gradients


class TrainingMemoryError(ConfigError):
    """The configured training would not fit in this machine's memory."""


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    activations_per_case: int  # elements
    batch_size: int

    @property
    def bytes(self) -> int:
        weights = FLOAT_BYTES * self.parameters * OPTIMIZER_COPIES
        return weights + BACKWARD_FACTOR * self.batch_size * self.activations_per_case * FLOAT_BYTES


def estimate_training_memory(config: RunConfig) -> MemoryEstimate | None:
    """The estimate for one site's training step; None when the network cannot be traced on the meta device."""
    try:
        with torch.device("meta"):
            model = build_model(config.task, config.model)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        activations = _activation_elements(model, image_size=_input_size(config))
    except ConfigError:
        raise
    except Exception as error:  # an estimate is a courtesy: a network the tracer cannot run is not refused
        logger.debug("memory estimate skipped: %s", error)
        return None
    return MemoryEstimate(parameters=parameters, activations_per_case=activations, batch_size=config.train.batch_size)


def available_memory(config: RunConfig) -> tuple[int, str] | None:
    """Bytes training can use and where they are (GPU or RAM); None when unknown."""
    if config.train.device != "cpu" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), "free GPU memory"
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    return None


def check_training_memory(config: RunConfig, *, source: str) -> None:
    """Refuse a config whose training step would not fit (see the module docstring for the estimate)."""
    estimate = estimate_training_memory(config)
    available = available_memory(config)
    if estimate is None or available is None:
        return
    limit, where = available
    size_key = "train.patch_size" if config.task.scan_geometry else "task.image_size"
    logger.debug("training memory estimate %s, %s %s", _gib(estimate.bytes), where, _gib(limit))
    if estimate.bytes > limit:
        raise TrainingMemoryError(
            f"{source}: training needs about {_gib(estimate.bytes)} ({size_key} = {_input_size(config)}, "
            f"train.batch_size = {config.train.batch_size}, {estimate.parameters:,} parameters) but this machine "
            f"has {_gib(limit)} of {where}. Lower {size_key} (e.g. {_smaller(_input_size(config))}) "
            "or train.batch_size, or use fewer model.channels."
        )


def _activation_elements(model: nn.Module, *, image_size: list[int]) -> int:
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [module for module in model.modules() if not list(module.children())]
    first = next(module for module in leaves if hasattr(module, "in_channels") or hasattr(module, "in_features"))
    in_channels = getattr(first, "in_channels", None) or first.in_features
    hooks = [module.register_forward_hook(count) for module in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(1, in_channels, *image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def _input_size(config: RunConfig) -> list[int]:
    """What one training sample measures: a patch in scan geometry, else the fixed grid."""
    return list(config.train.patch_size or config.task.image_size)


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def _smaller(image_size: list[int]) -> list[int]:
    return [max(8, 2 ** int(math.log2(max(size, 8)) - 2)) for size in image_size]
