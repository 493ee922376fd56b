"""Rendering a scan phantom's anatomy onto one site's voxel grid, one image per modality and a lesion depth map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter

from .anatomy import Anatomy, Ellipsoid, Field, Grid, Lesion
from .contrasts import LESION_ID, LESION_TISSUES, TISSUES, signal_table

TEXTURE_AMPLITUDE = 0.1  # relative signal change from tissue texture, as the voxel phantoms' 0.05 on ~0.5
DETAIL_AMPLITUDE = 0.06  # enhancement: fine texture worth restoring
PARTIAL_VOLUME_SIGMA = 0.6  # voxels, as the voxel phantoms' partial-volume edge
THERMAL_NOISE = 0.01  # as the voxel phantoms


def render(
    anatomy: Anatomy, grid: Grid, *, modalities: Sequence[str], rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """(one float32 image per modality, lesion depth map: 0 outside, 1 oedema, 2 core, 3 enhancing)."""
    axes = grid.axes()
    organ = _ellipsoid_mask(anatomy.organ, axes)
    white = Ellipsoid(anatomy.organ.center, anatomy.organ.radii * anatomy.white_scale, anatomy.organ.rotation)
    tissue = organ.astype(np.uint8) * TISSUES.index("grey_matter")
    tissue[_ellipsoid_mask(white, axes) & organ] = TISSUES.index("white_matter")
    for cyst in anatomy.fluid:
        tissue[_ellipsoid_mask(cyst, axes) & organ] = TISSUES.index("fluid")
    depth = np.zeros(grid.shape, dtype=np.uint8)
    for index, lesion in enumerate(anatomy.lesions):
        _paint_lesion(lesion, index=index, axes=axes, organ=organ, tissue=tissue, depth=depth)
    modulation = TEXTURE_AMPLITUDE * _sample(anatomy.texture, axes)
    if anatomy.detail is not None:
        modulation += DETAIL_AMPLITUDE * _sample(anatomy.detail, axes)
    # Every random number of the acquisition before the first grid-sized draw (the thermal noise), so that
    # the contrasts do not depend on the grid either.
    tables = [signal_table(name, lesions=anatomy.lesions, rng=rng) for name in modalities]
    images = []
    for table in tables:
        image = table[tissue]
        # Tissue texture scales the signal, so every contrast shows it in proportion.
        image[organ] *= 1.0 + modulation[organ]
        image = gaussian_filter(image, sigma=PARTIAL_VOLUME_SIGMA)
        image += rng.normal(0.0, THERMAL_NOISE, size=grid.shape)
        images.append(image.astype(np.float32))
    return images, depth


def _paint_lesion(
    lesion: Lesion, *, index: int, axes: list[np.ndarray], organ: np.ndarray, tissue: np.ndarray, depth: np.ndarray
) -> None:
    box = _bounding_box(lesion.compartments[0], axes)
    if box is None:
        return
    coordinates = [axis[part] for axis, part in zip(axes, box)]
    inside = _inside(lesion.compartments[0], coordinates) & organ[box]
    own = inside.astype(np.uint8)
    for compartment in lesion.compartments[1:]:
        # Inside the eroded parent: a sub-region keeps a parent voxel on every side at any spacing, so a label
        # map never shows a core touching healthy tissue.
        inside = _inside(compartment, coordinates) & binary_erosion(inside)
        own += inside
    # Where lesions overlap the deeper compartment wins, in the label map and the image alike.
    wins = (own > 0) & (own >= depth[box])
    tissue[box][wins] = LESION_ID + len(LESION_TISSUES) * index + own[wins] - 1
    depth[box] = np.maximum(depth[box], own)


def _bounding_box(ellipsoid: Ellipsoid, axes: list[np.ndarray]) -> tuple[slice, ...] | None:
    """Index ranges around the ellipsoid with one voxel to spare, so that erosion sees its outside."""
    box = []
    for axis, center in zip(axes, ellipsoid.center):
        step = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
        reach = float(np.max(ellipsoid.radii)) + step
        low = int(np.searchsorted(axis, center - reach, side="left"))
        high = int(np.searchsorted(axis, center + reach, side="right"))
        if high <= low:
            return None
        box.append(slice(low, high))
    return tuple(box)


def _inside(ellipsoid: Ellipsoid, coordinates: list[np.ndarray]) -> np.ndarray:
    """Boolean mask on the open grid `coordinates` (mm), built axis by axis: no (voxels, ndim) array."""
    ndim = len(coordinates)
    offsets = [
        (values - center).reshape([-1 if axis == index else 1 for axis in range(ndim)])
        for index, (values, center) in enumerate(zip(coordinates, ellipsoid.center))
    ]
    total: np.ndarray | float = 0.0
    for own_axis in range(ndim):  # into the ellipsoid's own axes, one at a time
        local = sum(ellipsoid.rotation[index, own_axis] * offsets[index] for index in range(ndim))
        total = total + (local / ellipsoid.radii[own_axis]) ** 2
    return np.broadcast_to(np.asarray(total) <= 1.0, tuple(len(values) for values in coordinates)).copy()


def _ellipsoid_mask(ellipsoid: Ellipsoid, axes: list[np.ndarray]) -> np.ndarray:
    mask = np.zeros(tuple(len(axis) for axis in axes), dtype=bool)
    box = _bounding_box(ellipsoid, axes)
    if box is not None:
        mask[box] = _inside(ellipsoid, [axis[part] for axis, part in zip(axes, box)])
    return mask


def _sample(field: Field, axes: list[np.ndarray]) -> np.ndarray:
    """Linear interpolation of `field` at the voxel centres, one axis at a time."""
    out = field.values
    for index, (source, target) in enumerate(zip(field.axes, axes)):
        position = np.clip((target - source[0]) / (source[1] - source[0]), 0.0, len(source) - 1.0)
        low = np.minimum(np.floor(position).astype(np.intp), len(source) - 2)
        weight = (position - low).reshape([-1 if axis == index else 1 for axis in range(out.ndim)])
        out = np.take(out, low, axis=index) * (1.0 - weight) + np.take(out, low + 1, axis=index) * weight
    return out
