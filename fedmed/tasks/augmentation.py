"""MONAI augmentations beyond flips for grid-geometry samples (e.g. chest X-rays at 224²)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from fedmed.config import AugmentationConfig, TaskConfig

from .base import Sample


class AugmentedSamples(Dataset):
    """Each read of a sample is a fresh random rotation, zoom and intensity change; flips stay batch-level
    (fedmed.tasks.batches.random_flips) so runs without these augmentations are unchanged."""

    def __init__(
        self, samples: Sequence[Sample], *, config: TaskConfig, augmentation: AugmentationConfig, seed: int
    ) -> None:
        # MONAI's transforms are heavy: imported only when a run augments beyond flips.
        from monai.transforms import Compose

        from fedmed.data.scans import augmentations

        self.samples = samples
        keys = ("image", "label") if config.kind == "segmentation" else ("image",)
        self.transform = Compose(augmentations(augmentation, spatial_dims=config.spatial_dims, keys=keys, flips=False))
        self.transform.set_random_state(seed=seed % (2**32))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        sample = self.samples[index]
        out: dict[str, Any] = self.transform(dict(sample))
        augmented = {key: _plain(value) for key, value in out.items()}
        if "label" in sample and sample["label"].dim() > 0:
            augmented["label"] = augmented["label"].round().to(sample["label"].dtype)
        return {key: augmented[key].to(sample[key].dtype) if key == "image" else augmented[key] for key in sample}


def _plain(value: Any) -> torch.Tensor:
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
