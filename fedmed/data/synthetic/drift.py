"""Simulated scanner and protocol differences between sites, applied to one image at a time.

The steps follow the acquisition chain: resolution and blur (optics / reconstruction), coil bias field,
the scanner's intensity response (gamma, scale, offset), then thermal noise last because it is added to
the measured signal.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as functional
from scipy.ndimage import gaussian_filter

from fedmed.config import SiteDrift


def apply_drift(image: np.ndarray, *, drift: SiteDrift, rng: np.random.Generator) -> np.ndarray:
    """Return a drifted float32 copy of a 2D or 3D image (no channel axis); deterministic for a given rng."""
    if image.ndim not in (2, 3):
        raise ValueError(f"apply_drift takes a 2D or 3D image without channel axis, got shape {image.shape}")
    out = np.asarray(image, dtype=np.float64).copy()
    if drift.downsample > 1:
        out = lower_resolution(out, factor=drift.downsample)
    if drift.blur_sigma > 0:
        out = gaussian_filter(out, sigma=drift.blur_sigma, mode="nearest")
    if drift.bias_field > 0:
        out = out * bias_field(out.shape, amplitude=drift.bias_field, rng=rng)
    if drift.gamma != 1.0:
        out = apply_gamma(out, gamma=drift.gamma)
    out = out * drift.intensity_scale + drift.intensity_offset
    if drift.noise_std > 0:
        span = float(out.max() - out.min())
        out = out + rng.normal(0.0, drift.noise_std * (span if span > 0 else 1.0), size=out.shape)
    return out.astype(np.float32)


def lower_resolution(image: np.ndarray, *, factor: int) -> np.ndarray:
    """Acquire at 1/factor resolution (area averaging), then interpolate back to the original grid."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64))[None, None]
    small = [max(1, round(size / factor)) for size in image.shape]
    low = functional.interpolate(tensor, size=small, mode="area")
    mode = "bilinear" if image.ndim == 2 else "trilinear"
    back = functional.interpolate(low, size=list(image.shape), mode=mode, align_corners=False)
    return back[0, 0].numpy()


def bias_field(shape: tuple[int, ...], *, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random multiplicative field spanning exactly [1 - amplitude, 1 + amplitude].

    A random polynomial of degree 2 in the normalised coordinates: low-frequency like a receive-coil
    sensitivity profile, and cheap at any image size.
    """
    # Open grids: each term is only as big as the axes it involves, so a large volume holds a few full-size
    # arrays instead of one per term (same values, element by element).
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, size) for size in shape], indexing="ij", sparse=True)
    terms = [np.ones(shape), *axes]
    terms += [first * second for first, second in itertools.combinations_with_replacement(axes, 2)]
    coefficients = rng.normal(0.0, 1.0, size=len(terms))
    coefficients[0] = 0.0
    field = sum(coefficient * term for coefficient, term in zip(coefficients, terms))
    low, high = float(field.min()), float(field.max())
    if high - low < 1e-12:
        return np.ones(shape)
    return 1.0 + amplitude * (2.0 * (field - low) / (high - low) - 1.0)


def apply_gamma(image: np.ndarray, *, gamma: float) -> np.ndarray:
    """Gamma on the image rescaled to [0, 1], mapped back to the original range."""
    low, high = float(image.min()), float(image.max())
    if high - low < 1e-12:
        return image
    unit = (image - low) / (high - low)
    return low + np.power(unit, gamma) * (high - low)
