"""A scan-geometry site's intensity statistics: one SiteIntensityStats per channel, fitted in one streamed pass.

Modalities of one case (FLAIR, T1, ...) have unrelated scales, so each channel gets its own statistics, and,
for Nyúl, its own standard landmarks: the federation's standard is the channel-major concatenation of one
landmark list per channel (`average_landmarks(..., block=len(settings.landmarks))` averages each block).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedmed.config import NormalizationConfig
from fedmed.core.log import logger

from .fit import SITE_LEVEL_MODES, SiteIntensityStats, average_landmarks
from .foreground import _HISTOGRAM_RANGE_PERCENTILES
from .stream import StreamedChannel

# ct_window is fixed (nothing to fit): scan geometry applies it per image, as before.
STREAMED_MODES = tuple(mode for mode in SITE_LEVEL_MODES if mode != "ct_window")
_FIX = "delete the site's normalization.json so the site refits its statistics"


@dataclass(frozen=True)
class ScanIntensityStats:
    """The site's statistics per channel, and how many training volumes they came from."""

    method: str
    channels: tuple[SiteIntensityStats, ...]
    num_images: int

    def __post_init__(self) -> None:
        if self.method not in STREAMED_MODES:
            raise ValueError(f"scan intensity statistics: unknown method {self.method!r}; {_FIX}")
        if not self.channels or any(stats.method != self.method for stats in self.channels):
            raise ValueError(f"scan intensity statistics need one {self.method} entry per channel; {_FIX}")

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "channels": [stats.to_json() for stats in self.channels],
            "num_images": self.num_images,
        }

    @classmethod
    def from_json(cls, data: Any) -> ScanIntensityStats:
        if not isinstance(data, dict) or set(data) != {"method", "channels", "num_images"}:
            raise ValueError(f"scan intensity statistics must have keys method, channels, num_images; {_FIX}")
        if not isinstance(data["channels"], list):
            raise ValueError(f"scan intensity statistics: 'channels' must be a list; {_FIX}")
        num_images = data["num_images"]
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"scan intensity statistics: num_images must be a non-negative integer; {_FIX}")
        channels = tuple(SiteIntensityStats.from_json(entry) for entry in data["channels"])
        return cls(method=data["method"], channels=channels, num_images=num_images)

    @property
    def landmarks(self) -> list[float]:
        """Nyúl: the site's mean standardized landmarks, channel after channel (what the site shares)."""
        return [float(value) for stats in self.channels for value in stats.values["landmarks"]]  # type: ignore[union-attr]


def fit_scan_stats(
    volumes: Iterable[torch.Tensor], *, method: str, settings: NormalizationConfig
) -> tuple[ScanIntensityStats, dict[str, Any]]:
    """Statistics of the site's TRAINING volumes (channel-first, resampled), read one at a time; and the report's
    histograms of the first channel's foreground (raw, and as the model sees it for the affine modes)."""
    if method not in STREAMED_MODES:
        raise ValueError(
            f"no streamed statistics for task.intensity {method!r}; use one of {', '.join(STREAMED_MODES)}"
        )
    channels: list[StreamedChannel] = []
    count = 0
    for volume in volumes:
        if not channels:
            channels = [StreamedChannel(settings=settings, landmarks=method == "nyul") for _ in range(volume.shape[0])]
        if volume.shape[0] != len(channels):
            raise ValueError(
                f"training volume {count} has {volume.shape[0]} channel(s) but the first had {len(channels)}; every "
                f"case must list the same modalities (`fedmed site check` names the case)"
            )
        if not bool(torch.isfinite(volume).all()):
            raise ValueError(
                f"training volume {count} has NaN or infinite intensities; fix or drop that case "
                f"(`fedmed site check` lists the files) before fitting intensity statistics"
            )
        for channel, accumulator in zip(volume, channels, strict=True):
            accumulator.add(channel)
        count += 1
    if count == 0:
        raise ValueError(f"cannot fit {method} statistics: the site has no training cases; add training cases")
    fitted = tuple(_channel_stats(acc, method=method, index=c, count=count) for c, acc in enumerate(channels))
    stats = ScanIntensityStats(method=method, channels=fitted, num_images=_num_images(channels, method, count))
    return stats, _report_histograms(channels[0], stats=stats.channels[0], settings=settings)


def normalize_scan_sites(scans: Sequence[Any], *, method: str, settings: NormalizationConfig) -> None:
    """Several ScanSites in one process (synthetic pre-training's scanners), each normalized with statistics streamed
    over its own training volumes, Nyúl's onto their image-weighted average: what a federation does across sites."""
    fitted = [fit_scan_stats(scan.training_volumes(), method=method, settings=settings)[0] for scan in scans]
    standard = None
    if method == "nyul":
        standard = average_landmarks([(s.landmarks, s.num_images) for s in fitted], block=len(settings.landmarks))
    for scan, stats in zip(scans, fitted, strict=True):
        scan.use_intensity(stats, standard_landmarks=standard)


def _channel_stats(channel: StreamedChannel, *, method: str, index: int, count: int) -> SiteIntensityStats:
    where = f"channel {index} of the site's {count} training volumes"
    if method == "site_zscore":
        if not channel.std > 0:
            raise ValueError(
                f"site_zscore: {where} have one foreground value ({channel.mean:g}), so the standard deviation "
                f"is 0; check the site's images (`fedmed site check`) or use another intensity mode"
            )
        return SiteIntensityStats(method=method, values={"mean": channel.mean, "std": channel.std}, num_images=count)
    if method == "site_percentile":
        low, high = channel.histogram.percentiles(list(channel.settings.percentiles))
        if not high > low:
            raise ValueError(
                f"site_percentile: the percentiles {list(channel.settings.percentiles)} of {where} are both "
                f"{low:g}; widen normalization.percentiles or use another intensity mode"
            )
        return SiteIntensityStats(method=method, values={"low": low, "high": high}, num_images=count)
    marks = channel.mean_landmarks()
    if marks is None:
        raise ValueError(
            f"nyul: {where} all have a flat foreground (first and last landmark equal), so no histogram can be "
            f"standardized; check the site's images or use another intensity mode"
        )
    if channel.flat_volumes:
        logger.warning(
            "nyul: %d of %d training volumes are flat in channel %d and were left out",
            channel.flat_volumes,
            count,
            index,
        )
    return SiteIntensityStats(method=method, values={"landmarks": marks}, num_images=channel.landmark_volumes)


def _num_images(channels: Sequence[StreamedChannel], method: str, count: int) -> int:
    # Nyúl weighs a site's landmarks by the volumes that carried a histogram shape in every channel (at least).
    return min(channel.landmark_volumes for channel in channels) if method == "nyul" else count


def _report_histograms(
    channel: StreamedChannel, *, stats: SiteIntensityStats, settings: NormalizationConfig
) -> dict[str, Any]:
    """The run report's before/after histograms (as the fixed grid's), read off the streamed histogram."""
    bins, histogram = settings.histogram_bins, channel.histogram
    low, high = histogram.percentiles(list(_HISTOGRAM_RANGE_PERCENTILES))
    shared: dict[str, Any] = {
        "before": {"counts": histogram.rebinned(bins=bins, low=low, high=high), "low": low, "high": high}
    }
    if stats.method == "site_zscore":
        mean, std = float(stats.values["mean"]), float(stats.values["std"])  # type: ignore[arg-type]
        counts = histogram.rebinned(bins=bins, low=-4.0, high=4.0, scale=1.0 / std, shift=-mean / std)
        shared["after"] = {"counts": counts, "low": -4.0, "high": 4.0}
    elif stats.method == "site_percentile":
        first, last = float(stats.values["low"]), float(stats.values["high"])  # type: ignore[arg-type]
        scale = 1.0 / (last - first)
        counts = histogram.rebinned(bins=bins, low=0.0, high=1.0, scale=scale, shift=-first * scale)
        shared["after"] = {"counts": counts, "low": 0.0, "high": 1.0}
    return shared
