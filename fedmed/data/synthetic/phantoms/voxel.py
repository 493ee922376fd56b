"""Voxel phantoms: one generic contrast drawn on a voxel grid, an "organ" with texture, lesions to find and
unlabelled dark cysts. Frozen: existing synthetic federations must keep their exact voxels, so neither the
drawing nor the order of the random draws may change.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from .shapes import Frame, ball_volume, random_rotation

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
        lesion = _blob_in(organ=organ, frame=frame, volume=ball_volume(radius, len(shape)), rng=rng)
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


def _organ(shape: tuple[int, ...], *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Frame]:
    size = np.asarray(shape, dtype=np.float64)
    center = (size - 1) / 2 + rng.uniform(-0.04, 0.04, len(shape)) * size
    radii = size / 2 * rng.uniform(0.7, 0.86, len(shape))
    rotation = random_rotation(len(shape), rng=rng, max_angle=0.4)
    organ = _ellipsoid(shape, center=center, radii=radii, rotation=rotation)
    tissue = rng.uniform(0.42, 0.55)
    image = BACKGROUND + (tissue - BACKGROUND) * _soften(organ)
    image += organ * _texture(shape, sigma=max(1.0, float(size.min()) / 10), amplitude=0.05, rng=rng)
    return image, organ, Frame(center, radii, rotation)


def _add_cysts(image: np.ndarray, *, organ: np.ndarray, frame: Frame, rng: np.random.Generator) -> None:
    total = float(np.prod(image.shape))
    for _ in range(int(rng.integers(0, 3))):
        cyst = _blob_in(organ=organ, frame=frame, volume=total * rng.uniform(0.002, 0.01), rng=rng)
        image -= rng.uniform(0.1, 0.25) * _soften(cyst)


def _blob_in(*, organ: np.ndarray, frame: Frame, volume: float, rng: np.random.Generator) -> np.ndarray:
    ndim = organ.ndim
    radius = max(1.5, (volume / ball_volume(1.0, ndim)) ** (1.0 / ndim))
    aspect = np.exp(rng.uniform(-0.25, 0.25, ndim))
    radii = radius * aspect / np.prod(aspect) ** (1.0 / ndim)
    center = frame.inner_point(margin=radius, rng=rng)
    rotation = random_rotation(ndim, rng=rng, max_angle=math.pi)
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


def _texture(shape: tuple[int, ...], *, sigma: float, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    noise = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="wrap")
    return amplitude * noise / (noise.std() + 1e-12)


def _soften(mask: np.ndarray) -> np.ndarray:
    """Partial-volume edge, as a scanner would blur a sharp boundary."""
    return gaussian_filter(mask.astype(np.float64), sigma=0.6)
