"""Scan phantoms that look like real multi-modal brain scans: grey and white matter, fluid, and lesions with
nested oedema > core > enhancing compartments, drawn in millimetres and rendered at any site's voxel spacing,
seen through one contrast per modality (contrasts.CONTRASTS).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .anatomy import Anatomy, Grid, Lesion, draw_field, draw_fluid, draw_lesion, draw_organ, draw_texture
from .render import render
from .shapes import ball_volume
from .voxel import DEFAULT_SEGMENTATION_PREVALENCE


def scan_segmentation_phantom(
    grid: Grid,
    *,
    fov_mm: Sequence[float],
    voxel_mm: float,
    modalities: Sequence[str],
    num_classes: int,
    prevalence: float | None,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], np.ndarray]:
    """(one float32 image per modality, uint8 label map) on `grid`; 1-4 lesions aiming at `prevalence`.

    Labels: 2 classes mark whole lesions; 3 add the core (2) inside the oedema (1); 4 also the enhancing part
    (3) inside the core. Each sub-region has its parent on all sides. The random anatomy is drawn in mm before
    anything depends on `grid`, so one random stream gives the same anatomy at every spacing.
    """
    fov = np.asarray(fov_mm, dtype=np.float64)
    organ, frame = draw_organ(fov, rng=rng)
    fluid = draw_fluid(fov, frame=frame, rng=rng)
    ndim = len(fov)
    target = prevalence if prevalence is not None else DEFAULT_SEGMENTATION_PREVALENCE[ndim]
    organ_fraction = ball_volume(1.0, ndim) * float(np.prod(organ.radii)) / float(np.prod(fov))
    case_target = float(np.clip(target * math.exp(rng.normal(0.0, 0.25)), 0.3 * target, 0.8 * organ_fraction))
    count = int(rng.integers(1, 5))
    shares = rng.dirichlet(np.full(count, 3.0))
    wanted = case_target * float(np.prod(fov))
    # Sized from the ellipsoids' volumes, not from voxel counts, so that no voxel grid steers the anatomy.
    lesions = [draw_lesion(frame, volume=float(share) * wanted, min_radius=1.5 * voxel_mm, rng=rng) for share in shares]
    anatomy = Anatomy(organ, fluid=fluid, lesions=lesions, texture=draw_texture(fov, voxel_mm=voxel_mm, rng=rng))
    images, depth = render(anatomy, grid, modalities=modalities, rng=rng)
    return images, np.minimum(depth, num_classes - 1).astype(np.uint8)


def scan_classification_phantom(
    grid: Grid,
    *,
    fov_mm: Sequence[float],
    voxel_mm: float,
    modalities: Sequence[str],
    positive: bool,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """One float32 image per modality; a positive case holds one small lesion somewhere in the organ."""
    fov = np.asarray(fov_mm, dtype=np.float64)
    organ, frame = draw_organ(fov, rng=rng)
    fluid = draw_fluid(fov, frame=frame, rng=rng)
    lesions: list[Lesion] = []
    if positive:
        radius = max(1.5 * voxel_mm, float(fov.min()) * rng.uniform(0.06, 0.1))
        volume = ball_volume(radius, len(fov))
        lesions.append(draw_lesion(frame, volume=volume, min_radius=1.5 * voxel_mm, rng=rng))
    anatomy = Anatomy(organ, fluid=fluid, lesions=lesions, texture=draw_texture(fov, voxel_mm=voxel_mm, rng=rng))
    return render(anatomy, grid, modalities=modalities, rng=rng)[0]


def scan_enhancement_phantom(
    grid: Grid, *, fov_mm: Sequence[float], voxel_mm: float, modalities: Sequence[str], rng: np.random.Generator
) -> list[np.ndarray]:
    """One float32 image per modality: tissue boundaries, unlabelled lesions and fine texture worth restoring."""
    fov = np.asarray(fov_mm, dtype=np.float64)
    organ, frame = draw_organ(fov, rng=rng)
    fluid = draw_fluid(fov, frame=frame, rng=rng)
    total = float(np.prod(fov))
    lesions = [
        draw_lesion(frame, volume=total * rng.uniform(0.005, 0.03), min_radius=1.5 * voxel_mm, rng=rng)
        for _ in range(int(rng.integers(2, 6)))
    ]
    texture = draw_texture(fov, voxel_mm=voxel_mm, rng=rng)
    detail = draw_field(fov, step_mm=voxel_mm, sigma_cells=1.0, rng=rng)
    anatomy = Anatomy(organ, fluid=fluid, lesions=lesions, texture=texture, detail=detail)
    return render(anatomy, grid, modalities=modalities, rng=rng)[0]
