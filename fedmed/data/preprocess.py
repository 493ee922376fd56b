"""Per-image preprocessing: reorientation, resampling, label mapping, intensity normalisation.

Tensors are channel-first with any number of leading channels; normalisation statistics are per
channel, so a stack of N 2D images can be handled as N channels in one call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

IntensityMode = Literal["zscore", "percentile", "minmax", "none"]
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's convention: RAS+ world axes
PER_IMAGE_MODES = ("zscore", "percentile", "minmax", "none")
_EPS = 1e-8


def squeeze_spatial(tensor: torch.Tensor, *, spatial_dims: int) -> torch.Tensor:
    """Drop trailing singleton spatial axes: a 2D NIfTI is often stored as (H, W, 1)."""
    while tensor.ndim - 1 > spatial_dims and tensor.shape[-1] == 1:
        tensor = tensor[..., 0]
    return tensor


def spatial_shape_of(shape: Sequence[int]) -> tuple[int, ...]:
    """Spatial shape without trailing singleton axes beyond two dimensions."""
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    return tuple(int(size) for size in dims)


@functools.cache
def _orientation() -> Any:
    from monai.transforms import Orientation

    return Orientation(axcodes="RAS", labels=AXIS_LABELS)


def to_ras(image: Any) -> Any:
    """Reorient a 3D channel-first MetaTensor to RAS, so sites storing PSR, LPS, ... agree voxel for voxel."""
    return _orientation()(image)


def resize_image(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Area averaging when shrinking (no aliasing); linear with anti-aliasing when any axis grows."""
    from monai.transforms import Resize

    size = [int(value) for value in size]
    current = list(image.shape[1:])
    if current == size:
        return image.float()
    if all(new <= old for new, old in zip(size, current)):
        return Resize(size, mode="area")(image.float())
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return Resize(size, mode=mode, align_corners=False, anti_aliasing=True)(image.float())


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest neighbour: class indices must never be averaged into classes that are not there."""
    from monai.transforms import Resize

    size = [int(value) for value in size]
    if list(label.shape[1:]) == size:
        return label
    resized = Resize(size, mode="nearest-exact")(label.float())
    return torch.round(resized)


def map_labels(label: torch.Tensor, *, binarize: bool) -> torch.Tensor:
    mapped = (label > 0) if binarize else torch.round(label)
    return mapped.to(torch.int64)


def normalize_intensity(image: torch.Tensor, *, mode: IntensityMode) -> torch.Tensor:
    """Normalise each channel of a channel-first float tensor; constant channels become zeros."""
    image = image.float()
    if mode == "none":
        return image
    flat = image.reshape(image.shape[0], -1)
    if mode == "zscore":
        # Whole-image statistics are invariant to a site's intensity scale and offset, the drift we model.
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, unbiased=False, keepdim=True)
        out = (flat - mean) / torch.where(std > _EPS, std, torch.ones_like(std))
        return torch.where(std > _EPS, out, torch.zeros_like(out)).reshape(image.shape)
    if mode == "percentile":
        low_np, high_np = np.percentile(flat.detach().cpu().numpy(), [1.0, 99.0], axis=1)
        low = torch.as_tensor(low_np, dtype=flat.dtype).unsqueeze(1)
        high = torch.as_tensor(high_np, dtype=flat.dtype).unsqueeze(1)
    elif mode == "minmax":
        low = flat.min(dim=1, keepdim=True).values
        high = flat.max(dim=1, keepdim=True).values
    else:
        raise ValueError(f"unknown intensity mode {mode!r}; use zscore, percentile, minmax or none")
    span = high - low
    out = ((flat - low) / torch.where(span > _EPS, span, torch.ones_like(span))).clamp(0.0, 1.0)
    return torch.where(span > _EPS, out, torch.zeros_like(out)).reshape(image.shape)
