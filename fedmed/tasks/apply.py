"""Apply a trained model to new, unlabelled scans, with the preprocessing it was trained with.

Scan geometry: MONAI's pipeline of the run (reorient, resample, crop, normalize), sliding-window inference,
and `Invertd` back onto each scan's own grid. Fixed grid: the same resize-and-normalize as training
(fedmed.data.fixed_grid) and its inverse. Outputs are on the source file's voxels: a label map
(segmentation), class probabilities (classification) or the restored image in the source's intensity
units (enhancement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.config import RunConfig
from fedmed.data.fixed_grid import apply_on_source_grid
from fedmed.data.loading import per_image_intensity

from .volumes import predict_volume, sliding_window_inferer, to_original_grid


@dataclass
class Prediction:
    """One case's output: `volume` (channel-first, on the source grid) or `probabilities` (classification)."""

    volume: torch.Tensor | None = None
    probabilities: list[float] | None = None


class Predictor:
    """The model of a run, applied one case at a time (the case's image already read and checked)."""

    def __init__(self, model: nn.Module, *, config: RunConfig, device: torch.device) -> None:
        self.model = model.eval()
        self.config = config
        self.device = device
        self._inferer: Any = None

    @torch.no_grad()
    def predict(self, image: Any, *, files: list[str]) -> Prediction:
        """`image` is the case read by fedmed.data (channel-first MetaTensor); scan geometry re-reads `files`
        through MONAI's pipeline so its geometry record can be inverted."""
        task = self.config.task
        if task.scan_geometry:
            return Prediction(volume=self._predict_scan(files))
        output = self._apply_fixed_grid(image)
        if task.kind == "classification":
            return Prediction(probabilities=[float(value) for value in output])
        if task.kind == "enhancement":
            output = _source_intensities(output, image=image, mode=task.intensity, config=self.config)
        return Prediction(volume=output)

    def _apply_fixed_grid(self, image: Any) -> torch.Tensor:
        task = self.config.task
        return apply_on_source_grid(
            self.model,
            image,
            kind=task.kind,
            spatial_dims=task.spatial_dims,
            image_size=task.image_size,
            intensity=per_image_intensity(task),
        )

    def _predict_scan(self, files: list[str]) -> torch.Tensor:
        from fedmed.data.scans import preprocessing  # imports MONAI's transforms: only when a scan is applied

        config = self.config
        transform = preprocessing(config.task, config.normalization, with_label=False)
        item = transform({"image": files if len(files) > 1 else files[0]})
        if self._inferer is None:
            self._inferer = sliding_window_inferer(
                roi_size=config.roi_size, inference=config.inference, device=self.device
            )
        output = predict_volume(self.model, item["image"], inferer=self._inferer, device=self.device)
        if config.task.kind == "segmentation":
            probabilities = to_original_grid(output.softmax(dim=0), image=item["image"], preprocessing=transform)
            return probabilities.argmax(dim=0, keepdim=True).to(torch.uint8)
        restored = to_original_grid(output.clamp(0.0, 1.0), image=item["image"], preprocessing=transform)
        source = _read_channels(files)
        return _source_intensities(_plain(restored), image=source, mode=config.task.intensity, config=config)


def _source_intensities(restored: torch.Tensor, *, image: Any, mode: str, config: RunConfig) -> torch.Tensor:
    """Undo the per-channel intensity normalization, with the statistics of the image that went in, so the
    restored image is in the scanner's units like its input."""
    values = _plain(image).float().reshape(image.shape[0], -1)
    if mode == "zscore":
        nonzero = config.normalization.foreground == "nonzero" and config.task.scan_geometry
        rows = [row[row != 0] if nonzero and bool((row != 0).any()) else row for row in values]
        offset = torch.stack([row.mean() for row in rows])
        scale = torch.stack([row.std(unbiased=False) for row in rows])
    elif mode == "percentile":
        low, high = config.normalization.percentiles if config.task.scan_geometry else (1.0, 99.0)
        bounds = np.percentile(values.numpy(), [low, high], axis=1)
        offset, scale = torch.as_tensor(bounds[0]), torch.as_tensor(bounds[1] - bounds[0])
    elif mode == "minmax":
        offset, scale = values.min(dim=1).values, values.max(dim=1).values - values.min(dim=1).values
    elif mode == "ct_window":
        width = config.normalization.window_width
        offset = torch.full((values.shape[0],), config.normalization.window_level - width / 2)
        scale = torch.full((values.shape[0],), float(width))
    else:
        return restored
    shape = (-1,) + (1,) * (restored.dim() - 1)
    return restored * scale.float().reshape(shape) + offset.float().reshape(shape)


def _read_channels(files: list[str]) -> torch.Tensor:
    from monai.transforms import LoadImage  # MONAI is heavy: imported when first used

    load = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")
    return torch.cat([_plain(load(path)) for path in files], dim=0)


def _plain(tensor: Any) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
