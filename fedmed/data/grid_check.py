"""A case's modalities must share one voxel grid: the same shape and, within a tolerance, the same affine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .io import affine_of
from .preprocess import spatial_shape_of
from .problems import DataProblem

if TYPE_CHECKING:
    from monai.data import MetaTensor

AFFINE_TOLERANCE_MM = 1e-3


def modality_grid_problems(images: Sequence[MetaTensor], *, paths: Sequence[Path], entry: str) -> list[DataProblem]:
    """Every further modality of a case must lie on the first one's voxel grid: same shape and affine.

    A network sees the modalities as channels of one voxel, so a shifted or resampled modality would
    silently pair each voxel with another place in the body.
    """
    problems: list[DataProblem] = []
    first, first_path = images[0], Path(paths[0])
    shape = spatial_shape_of(first.shape[1:])
    for position, (image, path) in enumerate(zip(images[1:], paths[1:]), start=1):
        other = spatial_shape_of(image.shape[1:])
        where = f"{entry}, modality {position}"
        if other != shape:
            problems.append(
                DataProblem(
                    str(path),
                    f"modality shape {other} differs from shape {shape} of {first_path.name} ({where})",
                    f"resample every modality onto the grid of {first_path.name} (co-register them), or list the "
                    "right files in the case's 'image' list",
                )
            )
            continue
        difference = affine_difference(affine_of(image), affine_of(first))
        if difference > AFFINE_TOLERANCE_MM:
            problems.append(
                DataProblem(
                    str(path),
                    f"modality affine differs from the affine of {first_path.name} by up to {difference:.4g} mm "
                    f"({where})",
                    f"co-register the modalities and write each with the affine of {first_path.name} (copy the "
                    "header), or list the right files in the case's 'image' list",
                )
            )
    return problems


def affine_difference(left: np.ndarray, right: np.ndarray) -> float:
    # A 2D PNG and a NIfTI carry affines of different sizes: they cannot share a grid.
    if left.shape != right.shape:
        return float("inf")
    return float(np.max(np.abs(left - right)))
