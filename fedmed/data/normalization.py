"""Site-level intensity normalization: statistics fitted on a site's training images, applied to all of them.

Per-image modes (preprocess.py) remove each image's own scale and offset; the modes here keep the contrast
between a site's images and remove only the site's scanner/protocol shift:

- ``site_zscore`` / ``site_percentile``: one mean/std or one percentile range per site, from its training
  foreground voxels.
- ``ct_window``: a fixed Hounsfield window; nothing to fit.
- ``nyul``: Nyúl & Udupa histogram standardization done federatedly. Each site sends only its mean
  standardized landmarks (a handful of numbers in [0, 1]) and an image count; the server averages them
  (``average_landmarks``) and every site maps each image's own landmarks onto that average.

Everything here is plain torch/numpy: no Flower import, no state on disk (callers keep the statistics).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from fedmed.config.schema import NormalizationConfig
from fedmed.log import logger

if TYPE_CHECKING:
    from .loading import SiteData

SITE_LEVEL_MODES = ("site_zscore", "site_percentile", "ct_window", "nyul")
FOREGROUND_RULES = ("mean", "nonzero", "all")
# Percentiles of a pooled site need every voxel in memory at once; beyond this many a strided subsample
# estimates them to well under a histogram bin while keeping memory flat for large 3D sites.
MAX_PERCENTILE_VOXELS = 2_000_000
# The end bins of the report's histograms hold the tails, so outliers do not squash the rest.
_HISTOGRAM_RANGE_PERCENTILES = (0.5, 99.5)
_REQUIRED_VALUES: dict[str, tuple[str, ...]] = {
    "site_zscore": ("mean", "std"),
    "site_percentile": ("low", "high"),
    "nyul": ("landmarks",),
    "ct_window": (),
}


def foreground_mask(image: torch.Tensor, *, rule: str) -> torch.Tensor:
    """Voxels the statistics are computed on, as a bool tensor of the image's shape.

    "mean" keeps voxels above the image's mean (torchio's ZNormalization habit: drops the air around a
    head), "nonzero" keeps voxels that are not exactly 0 (skull-stripped data), "all" keeps everything.
    An empty mask (a constant image) falls back to all voxels so statistics are always defined.
    """
    if rule == "mean":
        mask = image > image.float().mean()
    elif rule == "nonzero":
        mask = image != 0
    elif rule == "all":
        return torch.ones(image.shape, dtype=torch.bool, device=image.device)
    else:
        raise ValueError(f"unknown foreground rule {rule!r}; use one of {', '.join(FOREGROUND_RULES)}")
    if not bool(mask.any()):
        return torch.ones(image.shape, dtype=torch.bool, device=image.device)
    # A plain tensor: MONAI MetaTensors would carry their metadata into every mask we index with.
    return mask.as_subclass(torch.Tensor)


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
    def from_json(cls, data: dict[str, Any]) -> "SiteIntensityStats":
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
        raise ValueError(
            f"site intensity statistics: high ({values['high']}) must exceed low ({values['low']}); {fix}"
        )
    if method == "nyul":
        marks = values["landmarks"]
        assert isinstance(marks, list)
        if any(b < a for a, b in zip(marks, marks[1:])):
            raise ValueError(f"site intensity statistics: landmarks {marks} must be non-decreasing; {fix}")


def _foreground_values(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return image.detach().cpu().to(torch.float64).numpy()[mask.detach().cpu().numpy()]


def _check_finite(images: Sequence[torch.Tensor]) -> None:
    for index, image in enumerate(images):
        if bool(torch.isfinite(image).all()):
            continue
        raise ValueError(
            f"training image {index} has NaN or infinite intensities; fix or drop that case "
            f"(`fedmed site check` lists the files) before fitting intensity statistics"
        )


def fit_site_stats(
    images: Sequence[torch.Tensor], *, method: str, settings: NormalizationConfig
) -> SiteIntensityStats:
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
            f"use foreground = \"all\" or another intensity mode"
        )
    return SiteIntensityStats(method="site_zscore", values={"mean": mean, "std": std}, num_images=len(images))


def _pooled_foreground(
    images: Sequence[torch.Tensor], *, masks: Sequence[torch.Tensor], limit: int
) -> tuple[np.ndarray, int]:
    """The foreground voxels of all images, strided down to at most about `limit`, and the full count."""
    total = sum(int(mask.sum()) for mask in masks)
    step = max(1, math.ceil(total / limit))
    parts = [_foreground_values(image, mask)[::step] for image, mask in zip(images, masks)]
    return (np.concatenate(parts) if parts else np.empty(0)), total


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
    return SiteIntensityStats(
        method="site_percentile", values={"low": low, "high": high}, num_images=len(images)
    )


def _image_landmarks(image: torch.Tensor, *, settings: NormalizationConfig) -> np.ndarray:
    values = _foreground_values(image, foreground_mask(image, rule=settings.foreground))
    return np.percentile(values, settings.landmarks)


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


def average_landmarks(site_landmarks: Sequence[tuple[Sequence[float], int]]) -> list[float]:
    """The server's step of federated Nyúl: the image-count weighted mean of the sites' landmarks."""
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
    return [float(value) for value in np.maximum.accumulate(average)]


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
    data: "SiteData",
    *,
    method: str,
    stats: SiteIntensityStats | None,
    standard_landmarks: Sequence[float] | None,
    settings: NormalizationConfig,
) -> "SiteData":
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


def intensity_histogram(
    images: Sequence[torch.Tensor],
    *,
    bins: int,
    rule: str,
    masks: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Histogram of the site's foreground voxels for the report: {"counts", "low", "high"}.

    Pass the masks computed on the raw images to the before and the after call, so both count the same
    voxels (normalization moves the image mean, and with it the "mean" rule's foreground).
    """
    if bins < 1:
        raise ValueError(f"a histogram needs at least 1 bin, got {bins}; use normalization.histogram_bins >= 4")
    if masks is None:
        masks = [foreground_mask(image, rule=rule) for image in images]
    elif len(masks) != len(images):
        raise ValueError(f"got {len(masks)} masks for {len(images)} images; pass one mask per image")
    for index, (image, mask) in enumerate(zip(images, masks)):
        if tuple(mask.shape) != tuple(image.shape):
            raise ValueError(
                f"mask {index} has shape {tuple(mask.shape)} but its image has {tuple(image.shape)}; "
                f"compute the masks with foreground_mask on the same images"
            )
    masks = [mask.to(torch.bool) for mask in masks]
    sample, total = _pooled_foreground(images, masks=masks, limit=MAX_PERCENTILE_VOXELS)
    sample = sample[np.isfinite(sample)]
    if total == 0 or sample.size == 0:
        # A report must still render for a site with nothing to show.
        return {"counts": [0] * bins, "low": 0.0, "high": 0.0}
    low, high = (float(value) for value in np.percentile(sample, list(_HISTOGRAM_RANGE_PERCENTILES)))
    edges_high = high if high > low else low + 1.0
    counts = np.zeros(bins, dtype=np.int64)
    for image, mask in zip(images, masks):
        values = _foreground_values(image, mask)
        values = values[np.isfinite(values)]
        clipped = np.clip(values, low, edges_high)
        counts += np.histogram(clipped, bins=bins, range=(low, edges_high))[0]
    return {"counts": [int(count) for count in counts], "low": low, "high": high}
