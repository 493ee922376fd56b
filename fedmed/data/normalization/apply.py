"""Applying a site's fitted statistics (or the federation's Nyúl landmarks) to one image or a whole SiteData.

MONAI is imported inside the calls that use it, so importing fedmed.data stays cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedmed.config import NormalizationConfig

from .fit import SITE_LEVEL_MODES, SiteIntensityStats
from .foreground import _image_landmarks

if TYPE_CHECKING:
    from fedmed.data.loading import SiteData


def normalize_image(
    image: torch.Tensor,
    *,
    method: str,
    stats: SiteIntensityStats | None,
    standard_landmarks: Sequence[float] | None,
    settings: NormalizationConfig,
) -> torch.Tensor:
    """One image normalized with its site's statistics; a new float32 tensor of the same shape."""
    if method not in SITE_LEVEL_MODES:
        raise ValueError(f"unknown site-level intensity mode {method!r}; use one of {', '.join(SITE_LEVEL_MODES)}")
    image = image.float()
    if method == "ct_window":
        low = settings.window_level - settings.window_width / 2
        return _scale_to_unit(image, low=low, high=low + settings.window_width)
    if method == "nyul":
        return _normalize_nyul(image, standard_landmarks=standard_landmarks, settings=settings)
    if stats is None:
        raise ValueError(
            f"{method} needs the site's intensity statistics, but none were given; the site must fit its "
            f"statistics first (fit_site_stats on its training images)"
        )
    if stats.method != method:
        raise ValueError(
            f"the site's intensity statistics were fitted for {stats.method}, not {method}; refit them with "
            f"fit_site_stats(method={method!r})"
        )
    if method == "site_zscore":
        from monai.transforms import NormalizeIntensity

        shift = NormalizeIntensity(subtrahend=float(stats.values["mean"]), divisor=float(stats.values["std"]))
        return _plain(shift(image))
    return _scale_to_unit(image, low=float(stats.values["low"]), high=float(stats.values["high"]))


def _scale_to_unit(image: torch.Tensor, *, low: float, high: float) -> torch.Tensor:
    """[low, high] onto [0, 1], clipped: MONAI's intensity window."""
    from monai.transforms import ScaleIntensityRange

    return _plain(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image))


def _plain(tensor: Any) -> torch.Tensor:
    """Samples travel through DataLoaders and Opacus as plain tensors, without MONAI metadata."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def _check_standard(standard_landmarks: Sequence[float] | None, *, settings: NormalizationConfig) -> np.ndarray:
    if standard_landmarks is None:
        raise ValueError(
            "nyul needs the federation's standard landmarks, but they are missing; the server must first "
            "collect every site's landmarks (fit_site_stats) and average them (average_landmarks)"
        )
    standard = np.asarray([float(value) for value in standard_landmarks], dtype=np.float64)
    if standard.size != len(settings.landmarks):
        raise ValueError(
            f"the federation's standard landmarks have {standard.size} values but normalization.landmarks has "
            f"{len(settings.landmarks)}; the sites and the server must use the same run config"
        )
    if not np.isfinite(standard).all() or (np.diff(standard) < 0).any():
        raise ValueError(
            f"the federation's standard landmarks {standard.tolist()} must be finite and non-decreasing; "
            f"recompute them with average_landmarks"
        )
    return standard


def _normalize_nyul(
    image: torch.Tensor, *, standard_landmarks: Sequence[float] | None, settings: NormalizationConfig
) -> torch.Tensor:
    standard = _check_standard(standard_landmarks, settings=settings)
    values = image.detach().cpu().to(torch.float64).numpy()
    own = _image_landmarks(image, settings=settings)
    # Repeated landmarks (flat stretches of the histogram) would make zero-width segments: keep one point
    # per distinct intensity, mapped to the mean of the standard values it stands for.
    knots, inverse = np.unique(own, return_inverse=True)
    targets = np.bincount(inverse, weights=standard) / np.bincount(inverse)
    if knots.size < 2:
        # One distinct landmark: the foreground is flat. Put it mid-scale and keep the rest of the image
        # in order with the standard span over the image's range.
        value_range = float(values.max() - values.min())
        slope = (standard[-1] - standard[0]) / value_range if value_range > 0 else 0.0
        mapped = targets[0] + (values - knots[0]) * slope
    else:
        mapped = np.interp(values, knots, targets)
        low_slope = (targets[1] - targets[0]) / (knots[1] - knots[0])
        high_slope = (targets[-1] - targets[-2]) / (knots[-1] - knots[-2])
        below, above = values < knots[0], values > knots[-1]
        mapped[below] = targets[0] + (values[below] - knots[0]) * low_slope
        mapped[above] = targets[-1] + (values[above] - knots[-1]) * high_slope
    return torch.from_numpy(mapped.astype(np.float32)).to(image.device)


def normalize_site(
    data: SiteData,
    *,
    method: str,
    stats: SiteIntensityStats | None,
    standard_landmarks: Sequence[float] | None,
    settings: NormalizationConfig,
) -> SiteData:
    """A new SiteData with every image normalized; the input's tensors (shared with a cache) stay untouched."""

    def convert(samples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return [
            {
                **sample,
                "image": normalize_image(
                    sample["image"],
                    method=method,
                    stats=stats,
                    standard_landmarks=standard_landmarks,
                    settings=settings,
                ),
            }
            for sample in samples
        ]

    return dataclasses.replace(data, train=convert(data.train), val=convert(data.val))
