"""Segmentation, classification and enhancement: train, evaluate, metrics. No federation here."""

from __future__ import annotations

from fedmed.config import TaskConfig

from .base import Sample, Task
from .device import select_device
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


__all__ = ["Sample", "Task", "TrainResult", "get_task", "select_device", "train_local"]
