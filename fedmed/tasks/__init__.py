"""Segmentation, classification and enhancement: one training loop (plain or DP-SGD), evaluation, metrics;
pre-training on synthetic phantoms (pretrain.py).

No federation here. Imports fedmed.models, fedmed.data, fedmed.config and fedmed.core.
"""

from __future__ import annotations

from fedmed.config import TaskConfig

from .base import Sample, Task
from .device import select_device
from .dp_sgd import DpSgdStep, PrivateModelError, check_private_model
from .training import TrainResult, train_local


def get_task(config: TaskConfig) -> Task:
    if config.kind == "segmentation":
        from .segmentation import SegmentationTask

        return SegmentationTask(config)
    if config.kind == "classification":
        from .classification import ClassificationTask

        return ClassificationTask(config)
    from .enhancement import EnhancementTask

    return EnhancementTask(config)


__all__ = [
    "DpSgdStep",
    "PrivateModelError",
    "Sample",
    "Task",
    "TrainResult",
    "check_private_model",
    "get_task",
    "select_device",
    "train_local",
]
