"""Segmentation (2D/3D): Dice + cross-entropy loss; Dice and HD95 metrics."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from fedmed.config import TaskConfig
from fedmed.data.scan_site import VolumeCases

from .base import Sample, Task, batches
from .registry import TASKS
from .volumes import evaluate_segmentation_volumes

EVAL_BATCH = 8


@TASKS.register("segmentation")
class SegmentationTask(Task):
    primary_metric = "dice"

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        from monai.losses import DiceCELoss  # MONAI is heavy: imported when first used

        self._loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss(self, model: nn.Module, batch: Sample, *, generator: torch.Generator) -> torch.Tensor:
        return self._loss(model(batch["image"]), batch["label"])

    def evaluate_cases(
        self, model: nn.Module, samples: Sequence[Sample], *, device: torch.device
    ) -> tuple[dict[str, float], list[dict]]:
        if isinstance(samples, VolumeCases):
            return evaluate_segmentation_volumes(model, samples, task=self.config, device=device)
        return self.evaluate(model, samples, device=device), []

    @torch.no_grad()
    def evaluate(self, model: nn.Module, samples: Sequence[Sample], *, device: torch.device) -> dict[str, float]:
        """Dice and HD95 (voxels of the resampled grid) on image_size samples; whole volumes in scan geometry
        are scored in the original image space (HD95 in mm)."""
        if isinstance(samples, VolumeCases):
            return self.evaluate_cases(model, samples, device=device)[0]
        from monai.metrics import DiceMetric, HausdorffDistanceMetric  # MONAI is heavy: imported when first used
        from monai.networks.utils import one_hot

        dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean")
        classes = self.config.num_classes
        model.eval()
        loss_total = 0.0
        for batch in batches(samples, batch_size=EVAL_BATCH, device=device):
            logits = model(batch["image"]).float()
            loss_total += float(self._loss(logits, batch["label"])) * len(batch["image"])
            prediction = one_hot(logits.argmax(dim=1, keepdim=True), num_classes=classes)
            truth = one_hot(batch["label"], num_classes=classes)
            dice(prediction, truth)
            with warnings.catch_warnings():
                # Empty prediction or ground truth gives nan/inf per case; those cases are skipped below.
                warnings.simplefilter("ignore")
                hd95(prediction, truth)
        per_case_hd = hd95.get_buffer()
        finite = per_case_hd[torch.isfinite(per_case_hd)]
        return {
            "dice": _scalar(dice.aggregate()),
            "hd95": float(finite.mean()) if finite.numel() else math.nan,
            "loss": loss_total / max(len(samples), 1),
        }


def _scalar(value: torch.Tensor) -> float:
    return float(value.item()) if value.numel() else math.nan
