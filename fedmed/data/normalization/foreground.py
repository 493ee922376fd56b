"""A site's foreground voxels and what is measured on them: masks, pooled samples, landmarks, histograms.

Fitting, applying and the run report all measure the same voxels, so the rule for choosing them and
the subsampling of large sites live here once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmed.config import NormalizationConfig

FOREGROUND_RULES = ("mean", "nonzero", "all")
# Percentiles of a pooled site need every voxel in memory at once; beyond this many a strided subsample
# estimates them to well under a histogram bin while keeping memory flat for large 3D sites.
MAX_PERCENTILE_VOXELS = 2_000_000
# The end bins of the report's histograms hold the tails, so outliers do not squash the rest.
_HISTOGRAM_RANGE_PERCENTILES = (0.5, 99.5)


def foreground_mask(image: torch.Tensor, *, rule: str) -> torch.Tensor:
    """Voxels the statistics are computed on, as a bool tensor of the image's shape.

    "mean" keeps voxels above the image's mean (torchio's ZNormalization habit: drops the air around a
    head), "nonzero" keeps voxels that are not exactly 0 (skull-stripped data), "all" keeps everything.
    An empty mask (a constant image) falls back to all voxels so statistics are always defined.
    """
    if rule == "mean":
        mask = image > image.float().mean()
    elif rule == "nonzero":
        mask = image != 0
    elif rule == "all":
        return torch.ones(image.shape, dtype=torch.bool, device=image.device)
    else:
        raise ValueError(f"unknown foreground rule {rule!r}; use one of {', '.join(FOREGROUND_RULES)}")
    if not bool(mask.any()):
        return torch.ones(image.shape, dtype=torch.bool, device=image.device)
    # A plain tensor: MONAI MetaTensors would carry their metadata into every mask we index with.
    return mask.as_subclass(torch.Tensor)


def _foreground_values(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return image.detach().cpu().to(torch.float64).numpy()[mask.detach().cpu().numpy()]


def _pooled_foreground(
    images: Sequence[torch.Tensor], *, masks: Sequence[torch.Tensor], limit: int
) -> tuple[np.ndarray, int]:
    """The foreground voxels of all images, strided down to at most about `limit`, and the full count."""
    total = sum(int(mask.sum()) for mask in masks)
    step = max(1, math.ceil(total / limit))
    parts = [_foreground_values(image, mask)[::step] for image, mask in zip(images, masks)]
    return (np.concatenate(parts) if parts else np.empty(0)), total


def _image_landmarks(image: torch.Tensor, *, settings: NormalizationConfig) -> np.ndarray:
    values = _foreground_values(image, foreground_mask(image, rule=settings.foreground))
    return np.percentile(values, settings.landmarks)


def intensity_histogram(
    images: Sequence[torch.Tensor],
    *,
    bins: int,
    rule: str,
    masks: Sequence[torch.Tensor] | None = None,
    value_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Histogram of the site's foreground voxels for the report: {"counts", "low", "high"}.

    Pass the masks computed on the raw images to the before and the after call, so both count the same
    voxels (normalization moves the image mean, and with it the "mean" rule's foreground).

    Without `value_range` the range is the voxels' own 0.5th-99.5th percentiles. A fixed `value_range`
    keeps the range from saying anything about the data: two histograms of the same voxels with
    data-chosen ranges, before and after an affine normalization, give away the normalization's exact
    statistics (the percentiles move with the affine map).
    """
    if bins < 1:
        raise ValueError(f"a histogram needs at least 1 bin, got {bins}; use normalization.histogram_bins >= 4")
    if masks is None:
        masks = [foreground_mask(image, rule=rule) for image in images]
    elif len(masks) != len(images):
        raise ValueError(f"got {len(masks)} masks for {len(images)} images; pass one mask per image")
    for index, (image, mask) in enumerate(zip(images, masks)):
        if tuple(mask.shape) != tuple(image.shape):
            raise ValueError(
                f"mask {index} has shape {tuple(mask.shape)} but its image has {tuple(image.shape)}; "
                f"compute the masks with foreground_mask on the same images"
            )
    masks = [mask.to(torch.bool) for mask in masks]
    if value_range is not None:
        low, high = (float(value) for value in value_range)
        if not high > low:
            raise ValueError(f"a histogram range must be increasing, got {list(value_range)}; pass (low, high)")
    else:
        sample, total = _pooled_foreground(images, masks=masks, limit=MAX_PERCENTILE_VOXELS)
        sample = sample[np.isfinite(sample)]
        if total == 0 or sample.size == 0:
            # A report must still render for a site with nothing to show.
            return {"counts": [0] * bins, "low": 0.0, "high": 0.0}
        low, high = (float(value) for value in np.percentile(sample, list(_HISTOGRAM_RANGE_PERCENTILES)))
    edges_high = high if high > low else low + 1.0
    counts = np.zeros(bins, dtype=np.int64)
    for image, mask in zip(images, masks):
        values = _foreground_values(image, mask)
        values = values[np.isfinite(values)]
        clipped = np.clip(values, low, edges_high)
        counts += np.histogram(clipped, bins=bins, range=(low, edges_high))[0]
    return {"counts": [int(count) for count in counts], "low": low, "high": high}
