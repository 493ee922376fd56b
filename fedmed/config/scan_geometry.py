"""Scan geometry (task.spacing): [data], how a site holds its preprocessed volumes, [inference], the sliding
window over whole volumes, and the checks across [task], [train], [inference] and [model] that it needs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig


class DataConfig(StrictModel):
    """How a site holds its preprocessed cases (scan geometry): memory stays bounded whatever their number."""

    cache: Literal["disk", "memory", "none"] = Field(
        "disk",
        description="disk: every preprocessed case in the site's state folder (RAM does not grow with cases); "
        "memory: up to max_cached_cases in RAM; none: preprocess on every read",
    )
    max_cached_cases: int = Field(16, ge=0, description="memory cache: at most this many preprocessed cases in RAM")
    workers: int = Field(0, ge=0, description="DataLoader worker processes for training patches")


class InferenceConfig(StrictModel):
    """Sliding-window inference on whole volumes (scan geometry): validation and prediction."""

    roi_size: list[int] | None = Field(None, description="window size in voxels; default: train.patch_size")
    overlap: float = Field(0.5, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(2, ge=1)


def check_scan_geometry(run: RunConfig) -> None:
    """Volumes at task.spacing train on patches of train.patch_size and are validated by sliding window."""
    task, train = run.task, run.train
    if not task.scan_geometry:
        if train.patch_size is not None:
            raise ValueError("train.patch_size needs task.spacing (scan geometry); set task.spacing, e.g. [1, 1, 1]")
        return
    if train.patch_size is None:
        raise ValueError(
            "task.spacing trains on patches: set train.patch_size (voxels after resampling), e.g. [64, 64, 64]"
        )
    if len(train.patch_size) != 3:
        raise ValueError(f"train.patch_size {train.patch_size} needs 3 entries for 3D volumes")
    roi = run.inference.roi_size
    if roi is not None and len(roi) != 3:
        raise ValueError(f"inference.roi_size {roi} needs 3 entries for 3D volumes")
    superres = task.kind == "enhancement" and task.enhancement == "superres"
    if superres and any(size % task.superres_factor for size in train.patch_size):
        raise ValueError(
            f"train.patch_size {train.patch_size} must be divisible by superres_factor {task.superres_factor}"
        )
    divisor = run.model.total_stride
    if divisor > 1 and any(size % divisor for size in [*train.patch_size, *(roi or [])]):
        raise ValueError(
            f"train.patch_size {train.patch_size} (and inference.roi_size) must be divisible by the UNet's total "
            f"stride {divisor}; change the patch size or model.strides"
        )
