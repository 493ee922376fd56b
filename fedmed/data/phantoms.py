"""Synthetic tissue phantoms: an "organ" with texture, lesions to find, and unlabelled distractors.

Lesions vary in size and contrast (some barely above the texture) and dark cysts appear that are not
lesions, so a network cannot threshold its way to a good score and more training data keeps helping.

Two families. The voxel phantoms (`segmentation_phantom` & co.) draw one generic contrast on a voxel grid;
they are frozen, because existing synthetic federations must keep their exact voxels. The scan phantoms
(`scan_*_phantom`) look like real multi-modal brain scans: anatomy drawn in millimetres (grey and white
matter, fluid, lesions with nested oedema > core > enhancing compartments), rendered at any site's voxel
spacing and seen through one contrast per modality (`CONTRASTS`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_erosion, gaussian_filter

BACKGROUND = 0.05
DEFAULT_SEGMENTATION_PREVALENCE = {2: 0.03, 3: 0.02}


def segmentation_phantom(
    shape: tuple[int, ...], *, rng: np.random.Generator, prevalence: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8) with 1-4 lesions whose total size aims at `prevalence` of the image."""
    image, organ, frame = _organ(shape, rng=rng)
    _add_cysts(image, organ=organ, frame=frame, rng=rng)
    target = prevalence if prevalence is not None else DEFAULT_SEGMENTATION_PREVALENCE[len(shape)]
    # Cases differ around the site's target; lesions never fill more than most of the organ.
    case_target = float(np.clip(target * math.exp(rng.normal(0.0, 0.25)), 0.3 * target, 0.8 * organ.mean()))
    count = int(rng.integers(1, 5))
    shares = rng.dirichlet(np.full(count, 3.0))
    label = np.zeros(shape, dtype=bool)
    wanted = case_target * float(np.prod(shape))
    for already in np.cumsum(shares):
        # Size each lesion for what is still missing, so overlaps and clipping at the organ's edge do not
        # leave the case short of its target.
        missing = max(already * wanted - float(label.sum()), 0.25 * wanted / count)
        lesion = _blob_in(organ=organ, frame=frame, volume=missing, rng=rng)
        image += rng.uniform(0.08, 0.3) * _soften(lesion)
        label |= lesion
    image += rng.normal(0.0, 0.01, size=shape)
    return image.astype(np.float32), label.astype(np.uint8)


def classification_phantom(shape: tuple[int, ...], *, rng: np.random.Generator, positive: bool) -> np.ndarray:
    """Tissue phantom; a positive case holds one small low-contrast lesion somewhere in the organ."""
    image, organ, frame = _organ(shape, rng=rng)
    _add_cysts(image, organ=organ, frame=frame, rng=rng)
    if positive:
        radius = max(1.5, min(shape) * rng.uniform(0.06, 0.1))
        lesion = _blob_in(organ=organ, frame=frame, volume=_ball_volume(radius, len(shape)), rng=rng)
        image += rng.uniform(0.12, 0.3) * _soften(lesion)
    image += rng.normal(0.0, 0.01, size=shape)
    return image.astype(np.float32)


def enhancement_phantom(shape: tuple[int, ...], *, rng: np.random.Generator) -> np.ndarray:
    """Tissue phantom with sharp-edged internal structures: edges and texture worth restoring."""
    image, organ, frame = _organ(shape, rng=rng)
    total = float(np.prod(shape))
    for _ in range(int(rng.integers(3, 7))):
        structure = _blob_in(organ=organ, frame=frame, volume=total * rng.uniform(0.005, 0.03), rng=rng)
        image[structure] += rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.3)
    image += organ * _texture(shape, sigma=1.0, amplitude=0.03, rng=rng)
    return image.astype(np.float32)


class _Frame:
    """The organ's centre, semi-axes and rotation, so that blobs can be placed inside it."""

    def __init__(self, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> None:
        self.center = center
        self.radii = radii
        self.rotation = rotation

    def inner_point(self, *, margin: float, rng: np.random.Generator) -> np.ndarray:
        """A uniform point in the organ, at least `margin` voxels from its surface when possible."""
        ndim = len(self.center)
        direction = rng.normal(size=ndim)
        direction /= np.linalg.norm(direction) + 1e-12
        reach = max(0.0, 1.0 - margin / float(self.radii.min()))
        local = direction * reach * rng.uniform() ** (1.0 / ndim) * self.radii
        return self.center + self.rotation @ local


def _organ(shape: tuple[int, ...], *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, _Frame]:
    size = np.asarray(shape, dtype=np.float64)
    center = (size - 1) / 2 + rng.uniform(-0.04, 0.04, len(shape)) * size
    radii = size / 2 * rng.uniform(0.7, 0.86, len(shape))
    rotation = _random_rotation(len(shape), rng=rng, max_angle=0.4)
    organ = _ellipsoid(shape, center=center, radii=radii, rotation=rotation)
    tissue = rng.uniform(0.42, 0.55)
    image = BACKGROUND + (tissue - BACKGROUND) * _soften(organ)
    image += organ * _texture(shape, sigma=max(1.0, float(size.min()) / 10), amplitude=0.05, rng=rng)
    return image, organ, _Frame(center, radii, rotation)


def _add_cysts(image: np.ndarray, *, organ: np.ndarray, frame: _Frame, rng: np.random.Generator) -> None:
    total = float(np.prod(image.shape))
    for _ in range(int(rng.integers(0, 3))):
        cyst = _blob_in(organ=organ, frame=frame, volume=total * rng.uniform(0.002, 0.01), rng=rng)
        image -= rng.uniform(0.1, 0.25) * _soften(cyst)


def _blob_in(*, organ: np.ndarray, frame: _Frame, volume: float, rng: np.random.Generator) -> np.ndarray:
    ndim = organ.ndim
    radius = max(1.5, (volume / _ball_volume(1.0, ndim)) ** (1.0 / ndim))
    aspect = np.exp(rng.uniform(-0.25, 0.25, ndim))
    radii = radius * aspect / np.prod(aspect) ** (1.0 / ndim)
    center = frame.inner_point(margin=radius, rng=rng)
    rotation = _random_rotation(ndim, rng=rng, max_angle=math.pi)
    return _ellipsoid(organ.shape, center=center, radii=radii, rotation=rotation) & organ


def _ellipsoid(shape: tuple[int, ...], *, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Boolean mask, computed only inside the bounding box so that small blobs in big volumes stay cheap."""
    reach = float(np.max(radii)) + 1.0
    low = [max(0, math.floor(c - reach)) for c in center]
    high = [min(s, math.ceil(c + reach) + 1) for c, s in zip(center, shape)]
    mask = np.zeros(shape, dtype=bool)
    if any(hi <= lo for lo, hi in zip(low, high)):
        return mask
    axes = np.meshgrid(*[np.arange(lo, hi, dtype=np.float64) for lo, hi in zip(low, high)], indexing="ij")
    offsets = np.stack([axis - c for axis, c in zip(axes, center)], axis=-1)
    local = offsets @ rotation  # into the ellipsoid's own axes
    inside = np.sum((local / radii) ** 2, axis=-1) <= 1.0
    mask[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = inside
    return mask


def _random_rotation(ndim: int, *, rng: np.random.Generator, max_angle: float) -> np.ndarray:
    angles = rng.uniform(-max_angle, max_angle, size=1 if ndim == 2 else 3)
    if ndim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        first, second = [index for index in range(3) if index != axis]
        turn = np.eye(3)
        turn[first, first], turn[first, second], turn[second, first], turn[second, second] = c, -s, s, c
        rotation = rotation @ turn
    return rotation


def _texture(shape: tuple[int, ...], *, sigma: float, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    noise = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="wrap")
    return amplitude * noise / (noise.std() + 1e-12)


def _soften(mask: np.ndarray) -> np.ndarray:
    """Partial-volume edge, as a scanner would blur a sharp boundary."""
    return gaussian_filter(mask.astype(np.float64), sigma=0.6)


def _ball_volume(radius: float, ndim: int) -> float:
    return math.pi * radius**2 if ndim == 2 else 4.0 / 3.0 * math.pi * radius**3


# Scan phantoms ------------------------------------------------------------------------------------------------

TISSUES = ("background", "grey_matter", "white_matter", "fluid", "oedema", "core", "enhancing")
LESION_TISSUES = TISSUES[4:]  # a lesion's compartments, outermost first; label value = depth in this order
_LESION_ID = len(TISSUES) - len(LESION_TISSUES)  # tissue ids from here on: lesion i, compartment d

# Relative signal of each tissue (0: none, 1: the brightest), after the textbook look of a glioma on brain MRI.
# FLAIR: free fluid suppressed (dark), oedema brightest, grey matter above white. T1: white matter above grey,
# fluid dark, the tumour hypo- to iso-intense. T1Gd: T1 after gadolinium, the enhancing tumour brightest.
# T2: fluid brightest, oedema and necrotic core bright. MRI: the voxel phantoms' generic contrast (grey tissue,
# brighter lesions, darker cysts). Columns follow TISSUES.
CONTRASTS: dict[str, dict[str, float]] = {
    name: dict(zip(TISSUES, values, strict=True))
    for name, values in {
        "MRI": (0.05, 0.50, 0.46, 0.30, 0.62, 0.66, 0.70),
        "FLAIR": (0.02, 0.45, 0.36, 0.08, 0.85, 0.60, 0.72),
        "T1": (0.02, 0.42, 0.62, 0.12, 0.34, 0.22, 0.40),
        "T1Gd": (0.02, 0.42, 0.62, 0.12, 0.34, 0.22, 0.95),
        "T2": (0.02, 0.55, 0.40, 0.95, 0.82, 0.88, 0.65),
    }.items()
}
# Other spellings of the same contrasts, compared lower-case without punctuation ("T1-Gd" -> "t1gd").
CONTRAST_ALIASES = {
    "mr": "MRI",
    "mri": "MRI",
    "flair": "FLAIR",
    "t2flair": "FLAIR",
    "t1": "T1",
    "t1w": "T1",
    "t1gd": "T1Gd",
    "t1ce": "T1Gd",
    "t1c": "T1Gd",
    "t1wce": "T1Gd",
    "t1post": "T1Gd",
    "t2": "T2",
    "t2w": "T2",
}
# Unknown modalities: how far each tissue stands off white matter (either side), so that it stays visible.
FALLBACK_STEPS = {"fluid": (0.2, 0.4), "oedema": (0.15, 0.35), "core": (0.1, 0.3), "enhancing": (0.15, 0.4)}
TEXTURE_AMPLITUDE = 0.1  # relative signal change from tissue texture, as the voxel phantoms' 0.05 on ~0.5
DETAIL_AMPLITUDE = 0.06  # enhancement: fine texture worth restoring
PARTIAL_VOLUME_SIGMA = 0.6  # voxels, as _soften
THERMAL_NOISE = 0.01  # as the voxel phantoms


def contrast(name: str) -> dict[str, float]:
    """Each tissue's signal in modality `name`: `CONTRASTS` (aliases allowed), else a fixed table from the name.

    An unknown name gets its own table seeded by the name itself (not Python's salted hash), so it looks the
    same in every run, and every tissue other than grey matter stands a visible step off white matter.
    """
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    known = CONTRAST_ALIASES.get(key)
    if known is not None:
        return dict(CONTRASTS[known])
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
    white = float(rng.uniform(0.3, 0.6))
    values = {"background": 0.02, "white_matter": white, "grey_matter": white + float(rng.uniform(-0.12, 0.12))}
    for tissue, (low, high) in FALLBACK_STEPS.items():
        values[tissue] = white + float(rng.choice([-1.0, 1.0]) * rng.uniform(low, high))
    return {tissue: float(np.clip(values[tissue], 0.02, 1.0)) for tissue in TISSUES}


@dataclass(frozen=True)
class Grid:
    """A site's voxels: `shape` voxels of `spacing` mm, centred on the field of view (as its affine says)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]

    def axes(self) -> list[np.ndarray]:
        """Voxel centres along each axis, in mm from the field of view's centre."""
        return [(np.arange(size) - (size - 1) / 2.0) * step for size, step in zip(self.shape, self.spacing)]


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
    organ, frame = _draw_organ(fov, rng=rng)
    fluid = _draw_fluid(fov, frame=frame, rng=rng)
    ndim = len(fov)
    target = prevalence if prevalence is not None else DEFAULT_SEGMENTATION_PREVALENCE[ndim]
    organ_fraction = _ball_volume(1.0, ndim) * float(np.prod(organ.radii)) / float(np.prod(fov))
    case_target = float(np.clip(target * math.exp(rng.normal(0.0, 0.25)), 0.3 * target, 0.8 * organ_fraction))
    count = int(rng.integers(1, 5))
    shares = rng.dirichlet(np.full(count, 3.0))
    wanted = case_target * float(np.prod(fov))
    # Sized from the ellipsoids' volumes, not from voxel counts, so that no voxel grid steers the anatomy.
    lesions = [
        _draw_lesion(frame, volume=float(share) * wanted, min_radius=1.5 * voxel_mm, rng=rng) for share in shares
    ]
    anatomy = _Anatomy(organ, fluid=fluid, lesions=lesions, texture=_draw_texture(fov, voxel_mm=voxel_mm, rng=rng))
    images, depth = _render(anatomy, grid, modalities=modalities, rng=rng)
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
    organ, frame = _draw_organ(fov, rng=rng)
    fluid = _draw_fluid(fov, frame=frame, rng=rng)
    lesions: list[_Lesion] = []
    if positive:
        radius = max(1.5 * voxel_mm, float(fov.min()) * rng.uniform(0.06, 0.1))
        volume = _ball_volume(radius, len(fov))
        lesions.append(_draw_lesion(frame, volume=volume, min_radius=1.5 * voxel_mm, rng=rng))
    anatomy = _Anatomy(organ, fluid=fluid, lesions=lesions, texture=_draw_texture(fov, voxel_mm=voxel_mm, rng=rng))
    return _render(anatomy, grid, modalities=modalities, rng=rng)[0]


def scan_enhancement_phantom(
    grid: Grid, *, fov_mm: Sequence[float], voxel_mm: float, modalities: Sequence[str], rng: np.random.Generator
) -> list[np.ndarray]:
    """One float32 image per modality: tissue boundaries, unlabelled lesions and fine texture worth restoring."""
    fov = np.asarray(fov_mm, dtype=np.float64)
    organ, frame = _draw_organ(fov, rng=rng)
    fluid = _draw_fluid(fov, frame=frame, rng=rng)
    total = float(np.prod(fov))
    lesions = [
        _draw_lesion(frame, volume=total * rng.uniform(0.005, 0.03), min_radius=1.5 * voxel_mm, rng=rng)
        for _ in range(int(rng.integers(2, 6)))
    ]
    texture = _draw_texture(fov, voxel_mm=voxel_mm, rng=rng)
    detail = _draw_field(fov, step_mm=voxel_mm, sigma_cells=1.0, rng=rng)
    anatomy = _Anatomy(organ, fluid=fluid, lesions=lesions, texture=texture, detail=detail)
    return _render(anatomy, grid, modalities=modalities, rng=rng)[0]


@dataclass(frozen=True)
class _Ellipsoid:
    center: np.ndarray  # mm from the field of view's centre
    radii: np.ndarray  # mm
    rotation: np.ndarray


@dataclass(frozen=True)
class _Lesion:
    compartments: tuple[_Ellipsoid, ...]  # oedema, core, enhancing: each drawn inside the one before
    conspicuity: float  # 1: the contrast table's signal; lower: closer to healthy parenchyma


@dataclass(frozen=True)
class _Field:
    """A smooth random field with unit spread on a regular grid in mm, sampled onto any voxel grid."""

    axes: tuple[np.ndarray, ...]
    values: np.ndarray


@dataclass(frozen=True)
class _Anatomy:
    organ: _Ellipsoid
    fluid: list[_Ellipsoid]
    lesions: list[_Lesion]
    texture: _Field
    detail: _Field | None = None
    white_scale: float = 0.65  # white matter: the organ's core, this fraction of its radii


def _draw_organ(fov: np.ndarray, *, rng: np.random.Generator) -> tuple[_Ellipsoid, _Frame]:
    center = rng.uniform(-0.04, 0.04, len(fov)) * fov
    radii = fov / 2 * rng.uniform(0.7, 0.86, len(fov))
    rotation = _random_rotation(len(fov), rng=rng, max_angle=0.4)
    return _Ellipsoid(center, radii, rotation), _Frame(center, radii, rotation)


def _draw_fluid(fov: np.ndarray, *, frame: _Frame, rng: np.random.Generator) -> list[_Ellipsoid]:
    """Fluid-filled cysts: unlabelled, with a contrast of their own in each modality (dark FLAIR, bright T2)."""
    total = float(np.prod(fov))
    return [_draw_blob(frame, volume=total * rng.uniform(0.002, 0.01), rng=rng) for _ in range(int(rng.integers(0, 3)))]


def _draw_blob(frame: _Frame, *, volume: float, rng: np.random.Generator, min_radius: float = 0.0) -> _Ellipsoid:
    ndim = len(frame.center)
    radius = max(min_radius, (volume / _ball_volume(1.0, ndim)) ** (1.0 / ndim))
    aspect = np.exp(rng.uniform(-0.25, 0.25, ndim))
    radii = radius * aspect / np.prod(aspect) ** (1.0 / ndim)
    center = frame.inner_point(margin=radius, rng=rng)
    return _Ellipsoid(center, radii, _random_rotation(ndim, rng=rng, max_angle=math.pi))


def _draw_lesion(frame: _Frame, *, volume: float, min_radius: float, rng: np.random.Generator) -> _Lesion:
    compartments = [_draw_blob(frame, volume=volume, min_radius=min_radius, rng=rng)]
    for low, high in ((0.45, 0.7), (0.4, 0.65)):  # core within the oedema, enhancing part within the core
        parent = compartments[-1]
        ratio = rng.uniform(low, high, len(parent.radii))
        # Off-centre, as a tumour core rarely sits in the middle of its oedema.
        shift = parent.rotation @ (parent.radii * (1.0 - ratio) * rng.uniform(-0.5, 0.5, len(parent.radii)))
        compartments.append(_Ellipsoid(parent.center + shift, parent.radii * ratio, parent.rotation))
    return _Lesion(tuple(compartments), conspicuity=float(rng.uniform(0.5, 1.0)))


def _draw_texture(fov: np.ndarray, *, voxel_mm: float, rng: np.random.Generator) -> _Field:
    # Correlation length as the voxel phantoms' (a tenth of the image), in mm.
    sigma_mm = max(voxel_mm, float(fov.min()) / 10)
    return _draw_field(fov, step_mm=sigma_mm / 2, sigma_cells=2.0, rng=rng)


def _draw_field(fov: np.ndarray, *, step_mm: float, sigma_cells: float, rng: np.random.Generator) -> _Field:
    # On its own grid over the field of view (plus a margin), so its random draws do not depend on any site.
    sizes = [math.ceil(extent / step_mm) + 3 for extent in fov]
    axes = tuple((np.arange(size) - (size - 1) / 2.0) * step_mm for size in sizes)
    values = gaussian_filter(rng.normal(size=sizes), sigma=sigma_cells, mode="wrap")
    return _Field(axes, values / (values.std() + 1e-12))


def _render(
    anatomy: _Anatomy, grid: Grid, *, modalities: Sequence[str], rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """(one float32 image per modality, lesion depth map: 0 outside, 1 oedema, 2 core, 3 enhancing)."""
    axes = grid.axes()
    organ = _ellipsoid_mask(anatomy.organ, axes)
    white = _Ellipsoid(anatomy.organ.center, anatomy.organ.radii * anatomy.white_scale, anatomy.organ.rotation)
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
    tables = [_signal_table(name, lesions=anatomy.lesions, rng=rng) for name in modalities]
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
    lesion: _Lesion, *, index: int, axes: list[np.ndarray], organ: np.ndarray, tissue: np.ndarray, depth: np.ndarray
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
    tissue[box][wins] = _LESION_ID + len(LESION_TISSUES) * index + own[wins] - 1
    depth[box] = np.maximum(depth[box], own)


def _signal_table(name: str, *, lesions: list[_Lesion], rng: np.random.Generator) -> np.ndarray:
    """Signal per tissue id for one modality: the contrast table, varied a little per case and per lesion."""
    table = contrast(name)
    healthy = np.array([table[tissue] for tissue in TISSUES[:_LESION_ID]])
    healthy[1:] *= 1.0 + rng.normal(0.0, 0.03, _LESION_ID - 1)  # scanners and patients differ a little
    # A faint lesion fades towards the brain's average signal, neither grey nor white matter's.
    parenchyma = healthy[[TISSUES.index("grey_matter"), TISSUES.index("white_matter")]].mean()
    reference = (table["grey_matter"] + table["white_matter"]) / 2
    lesion_values = [
        parenchyma + lesion.conspicuity * (table[tissue] - reference) for lesion in lesions for tissue in LESION_TISSUES
    ]
    return np.concatenate([healthy, np.asarray(lesion_values, dtype=np.float64)])


def _bounding_box(ellipsoid: _Ellipsoid, axes: list[np.ndarray]) -> tuple[slice, ...] | None:
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


def _inside(ellipsoid: _Ellipsoid, coordinates: list[np.ndarray]) -> np.ndarray:
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


def _ellipsoid_mask(ellipsoid: _Ellipsoid, axes: list[np.ndarray]) -> np.ndarray:
    mask = np.zeros(tuple(len(axis) for axis in axes), dtype=bool)
    box = _bounding_box(ellipsoid, axes)
    if box is not None:
        mask[box] = _inside(ellipsoid, [axis[part] for axis, part in zip(axes, box)])
    return mask


def _sample(field: _Field, axes: list[np.ndarray]) -> np.ndarray:
    """Linear interpolation of `field` at the voxel centres, one axis at a time."""
    out = field.values
    for index, (source, target) in enumerate(zip(field.axes, axes)):
        position = np.clip((target - source[0]) / (source[1] - source[0]), 0.0, len(source) - 1.0)
        low = np.minimum(np.floor(position).astype(np.intp), len(source) - 2)
        weight = (position - low).reshape([-1 if axis == index else 1 for axis in range(out.ndim)])
        out = np.take(out, low, axis=index) * (1.0 - weight) + np.take(out, low + 1, axis=index) * weight
    return out
