"""What every task provides: a training loss and an evaluation with the task's metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from fedmed.config import TaskConfig

Sample = dict[str, torch.Tensor]


class Task(ABC):
    """A learning problem on site images; knows nothing about federation."""

    primary_metric: str
    higher_is_better: bool = True

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    @abstractmethod
    def loss(self, model: nn.Module, batch: Sample, *, generator: torch.Generator) -> torch.Tensor:
        """Loss of one batch already on the model's device; `generator` drives any synthesis."""

    @abstractmethod
    def evaluate(self, model: nn.Module, samples: Sequence[Sample], *, device: torch.device) -> dict[str, float]:
        """The task's metrics over `samples` (deterministic for a given model)."""

    def evaluate_cases(
        self, model: nn.Module, samples: Sequence[Sample], *, device: torch.device
    ) -> tuple[dict[str, float], list[dict]]:
        """The metrics and, for whole volumes in scan geometry, one row per case (they stay at the site)."""
        return self.evaluate(model, samples, device=device), []


def batches(samples: Sequence[Sample], *, batch_size: int, device: torch.device) -> list[Sample]:
    """Consecutive evaluation batches moved to `device`."""
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        out.append({key: torch.stack([sample[key] for sample in chunk]).to(device) for key in chunk[0]})
    return out
