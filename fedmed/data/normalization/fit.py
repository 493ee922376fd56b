"""Fitting a site's intensity statistics on its training images, and the server's averaging of Nyúl landmarks.

SiteIntensityStats is validated on construction because it comes back from the site's state file,
which may be stale or hand-edited.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmed.config import NormalizationConfig
from fedmed.core.log import logger

from .foreground import MAX_PERCENTILE_VOXELS, _foreground_values, _image_landmarks, _pooled_foreground, foreground_mask

SITE_LEVEL_MODES = ("site_zscore", "site_percentile", "ct_window", "nyul")
_REQUIRED_VALUES: dict[str, tuple[str, ...]] = {
    "site_zscore": ("mean", "std"),
    "site_percentile": ("low", "high"),
    "nyul": ("landmarks",),
    "ct_window": (),
}


@dataclass(frozen=True)
class SiteIntensityStats:
    """What a site learned from its training images; kept in the site's state, reapplied every round."""

    method: str
    values: dict[str, float | list[float]]
    num_images: int

    def __post_init__(self) -> None:
        _check_stats(method=self.method, values=self.values, num_images=self.num_images)

    def to_json(self) -> dict[str, Any]:
        values = {key: list(value) if isinstance(value, list) else value for key, value in self.values.items()}
        return {"method": self.method, "values": values, "num_images": self.num_images}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteIntensityStats:
        if not isinstance(data, dict) or set(data) != {"method", "values", "num_images"}:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"site intensity statistics must be an object with keys method, values, num_images (found "
                f"{found}); delete the stored statistics so the site refits them with fit_site_stats"
            )
        values = data["values"]
        if not isinstance(values, dict):
            raise ValueError(
                f"site intensity statistics: 'values' must be an object, not {type(values).__name__}; "
                f"delete the stored statistics so the site refits them with fit_site_stats"
            )
        parsed: dict[str, float | list[float]] = {}
        for key, value in values.items():
            if isinstance(value, list):
                parsed[key] = [_as_float(item, field=f"values.{key}") for item in value]
            else:
                parsed[key] = _as_float(value, field=f"values.{key}")
        return cls(method=data["method"], values=parsed, num_images=data["num_images"])


def _as_float(value: object, *, field: str) -> float:
    # bool is an int subclass; a stored true/false is corruption, not a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"site intensity statistics: {field} must be a number, not {value!r}; "
            f"delete the stored statistics so the site refits them with fit_site_stats"
        )
    return float(value)


def _check_stats(*, method: str, values: dict[str, float | list[float]], num_images: int) -> None:
    fix = "refit the site's statistics with fit_site_stats"
    if method not in _REQUIRED_VALUES:
        raise ValueError(
            f"site intensity statistics: unknown method {method!r} (one of {', '.join(SITE_LEVEL_MODES)} "
            f"expected); {fix}"
        )
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(
            f"site intensity statistics: num_images must be a non-negative integer, not {num_images!r}; {fix}"
        )
    required = _REQUIRED_VALUES[method]
    if set(values) != set(required):
        raise ValueError(
            f"site intensity statistics for {method} need exactly the values {list(required)}, "
            f"found {sorted(values)}; {fix}"
        )
    for key, value in values.items():
        numbers = value if isinstance(value, list) else [value]
        if key == "landmarks" and (not isinstance(value, list) or len(value) < 3):
            raise ValueError(f"site intensity statistics: landmarks must be a list of at least 3 numbers; {fix}")
        if key != "landmarks" and isinstance(value, list):
            raise ValueError(f"site intensity statistics: {key} must be a number, not a list; {fix}")
        if not all(math.isfinite(float(number)) for number in numbers):
            raise ValueError(f"site intensity statistics: {key} = {value!r} is not finite; {fix}")
    if method == "site_zscore" and not float(values["std"]) > 0:  # type: ignore[arg-type]
        raise ValueError(f"site intensity statistics: std must be positive, got {values['std']}; {fix}")
    if method == "site_percentile" and not float(values["high"]) > float(values["low"]):  # type: ignore[arg-type]
        raise ValueError(f"site intensity statistics: high ({values['high']}) must exceed low ({values['low']}); {fix}")
    if method == "nyul":
        marks = values["landmarks"]
        assert isinstance(marks, list)
        if any(b < a for a, b in itertools.pairwise(marks)):
            raise ValueError(f"site intensity statistics: landmarks {marks} must be non-decreasing; {fix}")


def _check_finite(images: Sequence[torch.Tensor]) -> None:
    for index, image in enumerate(images):
        if bool(torch.isfinite(image).all()):
            continue
        raise ValueError(
            f"training image {index} has NaN or infinite intensities; fix or drop that case "
            f"(`fedmed site check` lists the files) before fitting intensity statistics"
        )


def fit_site_stats(images: Sequence[torch.Tensor], *, method: str, settings: NormalizationConfig) -> SiteIntensityStats:
    """Fit the site's statistics from its TRAINING images (validation images must not leak in)."""
    if method not in SITE_LEVEL_MODES:
        raise ValueError(f"unknown site-level intensity mode {method!r}; use one of {', '.join(SITE_LEVEL_MODES)}")
    if len(images) == 0:
        raise ValueError(
            f"cannot fit {method} statistics: the site has no training images; add training cases to the site"
        )
    if method == "ct_window":
        return SiteIntensityStats(method=method, values={}, num_images=len(images))
    _check_finite(images)
    if method == "site_zscore":
        return _fit_zscore(images, settings=settings)
    if method == "site_percentile":
        return _fit_percentile(images, settings=settings)
    return _fit_nyul(images, settings=settings)


def _fit_zscore(images: Sequence[torch.Tensor], *, settings: NormalizationConfig) -> SiteIntensityStats:
    # Pooled moments combined image by image (Chan et al.) in float64: exact, no pooled array, no cancellation.
    count, mean, m2 = 0, 0.0, 0.0
    for image in images:
        values = _foreground_values(image, foreground_mask(image, rule=settings.foreground))
        n = values.size
        image_mean = float(values.mean())
        image_m2 = float(((values - image_mean) ** 2).sum())
        delta = image_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += image_m2 + delta * delta * count * n / total
        count = total
    std = math.sqrt(m2 / count)
    if not std > 0:
        raise ValueError(
            f"site_zscore: the foreground voxels of all {len(images)} training images have one value "
            f"({mean:g}), so the standard deviation is 0; check the site's images (`fedmed site check`) or "
            f'use foreground = "all" or another intensity mode'
        )
    return SiteIntensityStats(method="site_zscore", values={"mean": mean, "std": std}, num_images=len(images))


def _fit_percentile(images: Sequence[torch.Tensor], *, settings: NormalizationConfig) -> SiteIntensityStats:
    masks = [foreground_mask(image, rule=settings.foreground) for image in images]
    pooled, _ = _pooled_foreground(images, masks=masks, limit=MAX_PERCENTILE_VOXELS)
    low, high = (float(value) for value in np.percentile(pooled, list(settings.percentiles)))
    if not high > low:
        raise ValueError(
            f"site_percentile: the {settings.percentiles[0]:g}th and {settings.percentiles[1]:g}th percentiles "
            f"of the site's foreground voxels are both {low:g}, so the range is empty; widen "
            f"normalization.percentiles or use another intensity mode"
        )
    return SiteIntensityStats(method="site_percentile", values={"low": low, "high": high}, num_images=len(images))


def _fit_nyul(images: Sequence[torch.Tensor], *, settings: NormalizationConfig) -> SiteIntensityStats:
    standardized: list[np.ndarray] = []
    for image in images:
        marks = _image_landmarks(image, settings=settings)
        span = marks[-1] - marks[0]
        if span > 0:
            standardized.append((marks - marks[0]) / span)
    skipped = len(images) - len(standardized)
    if not standardized:
        raise ValueError(
            f"nyul: all {len(images)} training images have a flat foreground (first and last landmark equal), "
            f"so no histogram can be standardized; check the site's images or use another intensity mode"
        )
    if skipped:
        # A flat image carries no histogram shape; counting it would only pull the average towards nothing.
        logger.warning("nyul: %d of %d training images have a flat foreground and were left out", skipped, len(images))
    mean_marks = np.mean(np.stack(standardized), axis=0)
    # Rounding can leave a hair of disorder where neighbouring landmarks coincide.
    mean_marks = np.maximum.accumulate(mean_marks)
    return SiteIntensityStats(
        method="nyul", values={"landmarks": [float(v) for v in mean_marks]}, num_images=len(standardized)
    )


def average_landmarks(
    site_landmarks: Sequence[tuple[Sequence[float], int]], *, block: int | None = None
) -> list[float]:
    """The server's step of federated Nyúl: the image-count weighted mean of the sites' landmarks.

    `block`: the number of landmarks per channel; scan geometry sends one list per channel, concatenated, and each
    channel's block is kept in order on its own (None: one list)."""
    if len(site_landmarks) == 0:
        raise ValueError("cannot average landmarks: no site sent any; every site must fit nyul statistics first")
    lengths = {len(marks) for marks, _ in site_landmarks}
    if len(lengths) != 1:
        raise ValueError(
            f"cannot average landmarks: sites sent {sorted(lengths)} landmarks; every site must use the same "
            f"normalization.landmarks (they come from the run config, so rerun the sites with one config)"
        )
    weights = np.array([float(weight) for _, weight in site_landmarks])
    marks = np.array([[float(value) for value in values] for values, _ in site_landmarks])
    if not np.isfinite(marks).all() or not np.isfinite(weights).all():
        raise ValueError(
            "cannot average landmarks: a site sent NaN or infinite values; that site must refit its "
            "statistics with fit_site_stats"
        )
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"cannot average landmarks: image counts {weights.tolist()} must be non-negative with a positive "
            f"total; at least one site needs training images"
        )
    average = (weights[:, None] * marks).sum(axis=0) / weights.sum()
    size = average.size if block is None else block
    if size < 1 or average.size % size:
        raise ValueError(
            f"cannot average landmarks: sites sent {average.size} values, not a whole number of channels of {size} "
            f"landmarks; every site must use the run config's normalization.landmarks"
        )
    return [float(value) for part in average.reshape(-1, size) for value in np.maximum.accumulate(part)]
