"""A fixed-grid model applied to an image of any size, and its output put back on the image's own grid.

Training resizes every case to `task.image_size` (after reorienting 3D volumes to RAS); `to_model_grid`
is that same preprocessing for one image, and `to_source_grid` undoes it for a network output, so a label
map or restored image lands on the stored file's voxels with its affine.

Self-contained on purpose (torch, NumPy, MONAI and `.preprocess` only): `fedmed export` copies this file
and `preprocess.py` into a MONAI bundle's `scripts/`, where fedmed is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .preprocess import AXIS_LABELS, normalize_intensity, resize_image, squeeze_spatial, to_ras


@dataclass(frozen=True)
class GridRecord:
    """What `to_source_grid` needs to undo `to_model_grid`."""

    stored_shape: tuple[int, ...]  # the file's spatial shape, trailing singleton axes included
    grid_shape: tuple[int, ...]  # after reorientation (3D) or squeezing (2D), before resizing
    source_affine: np.ndarray
    oriented_affine: np.ndarray  # 3D: the RAS affine the model's grid was resized from


def to_model_grid(
    image: Any, *, spatial_dims: int, image_size: Sequence[int], intensity: str
) -> tuple[torch.Tensor, GridRecord]:
    """A channel-first image (MetaTensor as read from file) as the network saw its training cases."""
    source_affine = np.asarray(_affine(image), dtype=np.float64)
    stored_shape = tuple(int(size) for size in image.shape[1:])
    image = image.float()
    image = to_ras(image) if spatial_dims == 3 else squeeze_spatial(image, spatial_dims=2)
    record = GridRecord(
        stored_shape=stored_shape,
        grid_shape=tuple(int(size) for size in image.shape[1:]),
        source_affine=source_affine,
        oriented_affine=np.asarray(_affine(image), dtype=np.float64),
    )
    resized = resize_image(image, image_size)
    return normalize_intensity(_plain(resized), mode=intensity).contiguous(), record  # type: ignore[arg-type]


def to_source_grid(output: torch.Tensor, record: GridRecord) -> torch.Tensor:
    """A channel-first network output on the model's grid, resampled (linearly) onto the stored file's voxels.

    Interpolated, so class probabilities come back before the argmax."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    resized = _plain(resize_image(output.float(), record.grid_shape))
    if len(record.grid_shape) == 3:
        import nibabel

        oriented = MetaTensor(resized, affine=torch.as_tensor(record.oriented_affine))
        codes = "".join(nibabel.orientations.aff2axcodes(record.source_affine, labels=AXIS_LABELS))
        resized = _plain(Orientation(axcodes=codes, labels=AXIS_LABELS)(oriented))
    return resized.reshape(resized.shape[0], *record.stored_shape)


@torch.no_grad()
def apply_on_source_grid(
    network: torch.nn.Module,
    image: Any,
    *,
    kind: str,
    spatial_dims: int,
    image_size: Sequence[int],
    intensity: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """One image through the network: a label map (segmentation) or the restored image in normalized units
    (enhancement), both on the image's own voxels; or the class probabilities (classification), softmax(logits /
    temperature) with the temperature the federation fitted (1: uncalibrated)."""
    device = next(network.parameters()).device
    tensor, record = to_model_grid(image, spatial_dims=spatial_dims, image_size=image_size, intensity=intensity)
    output = network(tensor[None].to(device)).float().cpu()[0]
    if kind == "classification":
        return (output / temperature).softmax(dim=0)
    if kind == "segmentation":
        return to_source_grid(output.softmax(dim=0), record).argmax(dim=0, keepdim=True).to(torch.uint8)
    return to_source_grid(output.clamp(0.0, 1.0), record)


def _affine(image: Any) -> Any:
    affine = getattr(image, "affine", None)
    if affine is None:
        return np.eye(4)
    return affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine


def _plain(tensor: Any) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
