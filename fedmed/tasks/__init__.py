"""Segmentation, classification and enhancement: one training loop (plain or DP-SGD), evaluation, metrics;
pre-training on synthetic phantoms (pretrain.py) or a public data set (public_pretrain.py), the run's cached
starting weights (start_weights.py).

Adding a task is one new file here whose Task class registers itself (`@TASKS.register("kind")`) and one
line below that imports it (importing a file registers its task); a run then selects it with
`task.kind = "kind"`.

No federation here. Imports fedmed.models, fedmed.data, fedmed.config and fedmed.core.
"""

from __future__ import annotations

from .base import Sample, Task
from .classification import ClassificationTask  # noqa: F401 - registers "classification"
from .device import select_device
from .dp_sgd import DpSgdStep, PrivateModelError, check_private_model
from .enhancement import EnhancementTask  # noqa: F401 - registers "enhancement"
from .loss_terms import LossTerm, ProximalPull
from .registry import TASKS, TaskBuilder, get_task
from .segmentation import SegmentationTask  # noqa: F401 - registers "segmentation"
from .training import TrainResult, train_local

__all__ = [
    "TASKS",
    "DpSgdStep",
    "LossTerm",
    "PrivateModelError",
    "ProximalPull",
    "Sample",
    "Task",
    "TaskBuilder",
    "TrainResult",
    "check_private_model",
    "get_task",
    "select_device",
    "train_local",
]
