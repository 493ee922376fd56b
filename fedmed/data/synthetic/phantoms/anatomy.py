"""The scan phantoms' anatomy, drawn in millimetres before any voxel grid is known: the organ, fluid-filled
cysts, lesions with nested compartments and smooth texture fields. One random stream therefore gives the same
anatomy at every site's voxel spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from .shapes import Frame, ball_volume, random_rotation


@dataclass(frozen=True)
class Grid:
    """A site's voxels: `shape` voxels of `spacing` mm, centred on the field of view (as its affine says)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    def axes(self) -> list[np.ndarray]:
        """Voxel centres along each axis, in mm from the field of view's centre."""
        return [(np.arange(size) - (size - 1) / 2.0) * step for size, step in zip(self.shape, self.spacing)]


@dataclass(frozen=True)
class Ellipsoid:
    center: np.ndarray  # mm from the field of view's centre
    radii: np.ndarray  # mm
    rotation: np.ndarray


@dataclass(frozen=True)
class Lesion:
    compartments: tuple[Ellipsoid, ...]  # oedema, core, enhancing: each drawn inside the one before
    conspicuity: float  # 1: the contrast table's signal; lower: closer to healthy parenchyma


@dataclass(frozen=True)
class Field:
    """A smooth random field with unit spread on a regular grid in mm, sampled onto any voxel grid."""

    axes: tuple[np.ndarray, ...]
    values: np.ndarray


@dataclass(frozen=True)
class Anatomy:
    organ: Ellipsoid
    fluid: list[Ellipsoid]
    lesions: list[Lesion]
    texture: Field
    detail: Field | None = None
    white_scale: float = 0.65  # white matter: the organ's core, this fraction of its radii


def draw_organ(fov: np.ndarray, *, rng: np.random.Generator) -> tuple[Ellipsoid, Frame]:
    center = rng.uniform(-0.04, 0.04, len(fov)) * fov
    radii = fov / 2 * rng.uniform(0.7, 0.86, len(fov))
    rotation = random_rotation(len(fov), rng=rng, max_angle=0.4)
    return Ellipsoid(center, radii, rotation), Frame(center, radii, rotation)


def draw_fluid(fov: np.ndarray, *, frame: Frame, rng: np.random.Generator) -> list[Ellipsoid]:
    """Fluid-filled cysts: unlabelled, with a contrast of their own in each modality (dark FLAIR, bright T2)."""
    total = float(np.prod(fov))
    return [_draw_blob(frame, volume=total * rng.uniform(0.002, 0.01), rng=rng) for _ in range(int(rng.integers(0, 3)))]


def _draw_blob(frame: Frame, *, volume: float, rng: np.random.Generator, min_radius: float = 0.0) -> Ellipsoid:
    ndim = len(frame.center)
    radius = max(min_radius, (volume / ball_volume(1.0, ndim)) ** (1.0 / ndim))
    aspect = np.exp(rng.uniform(-0.25, 0.25, ndim))
    radii = radius * aspect / np.prod(aspect) ** (1.0 / ndim)
    center = frame.inner_point(margin=radius, rng=rng)
    return Ellipsoid(center, radii, random_rotation(ndim, rng=rng, max_angle=math.pi))


def draw_lesion(frame: Frame, *, volume: float, min_radius: float, rng: np.random.Generator) -> Lesion:
    compartments = [_draw_blob(frame, volume=volume, min_radius=min_radius, rng=rng)]
    for low, high in ((0.45, 0.7), (0.4, 0.65)):  # core within the oedema, enhancing part within the core
        parent = compartments[-1]
        ratio = rng.uniform(low, high, len(parent.radii))
        # Off-centre, as a tumour core rarely sits in the middle of its oedema.
        shift = parent.rotation @ (parent.radii * (1.0 - ratio) * rng.uniform(-0.5, 0.5, len(parent.radii)))
        compartments.append(Ellipsoid(parent.center + shift, parent.radii * ratio, parent.rotation))
    return Lesion(tuple(compartments), conspicuity=float(rng.uniform(0.5, 1.0)))


def draw_texture(fov: np.ndarray, *, voxel_mm: float, rng: np.random.Generator) -> Field:
    # Correlation length as the voxel phantoms' (a tenth of the image), in mm.
    sigma_mm = max(voxel_mm, float(fov.min()) / 10)
    return draw_field(fov, step_mm=sigma_mm / 2, sigma_cells=2.0, rng=rng)


def draw_field(fov: np.ndarray, *, step_mm: float, sigma_cells: float, rng: np.random.Generator) -> Field:
    # On its own grid over the field of view (plus a margin), so its random draws do not depend on any site.
    sizes = [math.ceil(extent / step_mm) + 3 for extent in fov]
    axes = tuple((np.arange(size) - (size - 1) / 2.0) * step_mm for size in sizes)
    values = gaussian_filter(rng.normal(size=sizes), sigma=sigma_cells, mode="wrap")
    return Field(axes, values / (values.std() + 1e-12))
