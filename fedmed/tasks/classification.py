"""Classification: cross-entropy loss; AUC, balanced accuracy and accuracy."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .base import Sample, Task, batches
from .registry import TASKS

EVAL_BATCH = 64


@TASKS.register("classification")
class ClassificationTask(Task):
    primary_metric = "auc"

    def loss(self, model: nn.Module, batch: Sample, *, generator: torch.Generator) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch["image"]), batch["label"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, samples: Sequence[Sample], *, device: torch.device) -> dict[str, float]:
        model.eval()
        logits, labels = [], []
        for batch in batches(samples, batch_size=EVAL_BATCH, device=device):
            logits.append(model(batch["image"]).float().cpu())
            labels.append(batch["label"].cpu())
        if not logits:
            return {"auc": math.nan, "balanced_accuracy": math.nan, "accuracy": math.nan, "loss": math.nan}
        all_logits, all_labels = torch.cat(logits), torch.cat(labels)
        predicted = all_logits.argmax(dim=1)
        return {
            "auc": roc_auc(all_logits.softmax(dim=1), all_labels, num_classes=self.config.num_classes),
            "balanced_accuracy": balanced_accuracy(predicted, all_labels),
            "accuracy": float((predicted == all_labels).float().mean()),
            "loss": float(nn.functional.cross_entropy(all_logits, all_labels)),
        }


def roc_auc(probabilities: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> float:
    """Binary AUC of the positive class, or macro one-vs-rest AUC; nan when a class is absent."""
    from monai.metrics import compute_roc_auc  # MONAI is heavy: imported when first used

    if len(torch.unique(labels)) < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if num_classes == 2:
            return float(compute_roc_auc(probabilities[:, 1], labels))
        one_hot = nn.functional.one_hot(labels, num_classes).float()
        return float(compute_roc_auc(probabilities, one_hot, average="macro"))


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the classes present in `labels`."""
    recalls = [float((predicted[labels == c] == c).float().mean()) for c in torch.unique(labels)]
    return sum(recalls) / len(recalls) if recalls else math.nan
