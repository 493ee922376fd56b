"""Site statistics streamed over whole volumes, one at a time, per channel: memory stays flat whatever the site's size.

Scan geometry never holds a site in memory, so the site-level modes cannot pool its voxels as the fixed grid does.
Each channel keeps instead:

- running moments (count, mean, sum of squared deviations) merged volume by volume in float64 (Chan et al.):
  the pooled foreground mean and std, exactly as over the concatenated voxels;
- a fixed-size histogram whose bins double in width when a volume falls outside the range so far (old bins merge
  two into one, so no count is ever re-estimated): percentiles read from it are within one bin of the pooled
  voxels' own, in one pass without knowing the range first;
- for Nyúl, the sum of each volume's standardized landmarks (the 2D path's per-image landmarks).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedmed.config import NormalizationConfig

from .foreground import _foreground_values, foreground_mask

# 2**16 bins: a pooled percentile is off by at most 2 / 65536 of the site's intensity range.
HISTOGRAM_BINS = 1 << 16


class StreamedHistogram:
    """Counts of values in HISTOGRAM_BINS equal bins starting at `origin`; widened (never re-estimated) as needed."""

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"a streamed histogram needs an even number of bins >= 2, got {bins}")
        self.counts = np.zeros(bins, dtype=np.int64)
        self.origin = 0.0
        self.width = 0.0  # 0 until the first value arrives

    @property
    def bins(self) -> int:
        return int(self.counts.size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return self.origin + self.width * np.arange(self.bins + 1, dtype=np.float64)

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        if self.width == 0.0:
            self.origin = low
            # The top value must land inside the last bin, and a flat first volume still needs a positive width.
            self.width = max((high - low) / self.bins * (1.0 + 1e-9), abs(low) * 1e-12, 1e-12)
        while low < self.origin or high >= self.origin + self.bins * self.width:
            self._widen(left=low < self.origin)
        index = np.floor((values - self.origin) / self.width).astype(np.int64)
        self.counts += np.bincount(np.clip(index, 0, self.bins - 1), minlength=self.bins)

    def _widen(self, *, left: bool) -> None:
        """Twice the width: old bins 2k and 2k+1 become bin k; growing left, the old range is the new right half."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        counts = np.zeros_like(self.counts)
        half = self.bins // 2
        if left:
            counts[half:] = merged
            self.origin -= self.bins * self.width
        else:
            counts[:half] = merged
        self.counts = counts
        self.width *= 2.0

    def percentiles(self, qs: list[float] | tuple[float, ...]) -> list[float]:
        """numpy's linear-interpolation percentiles of the counted values: the two values numpy interpolates between
        are each placed within their own bin, so the result is within one bin of numpy's on the pooled values."""
        total = self.total
        if total == 0:
            raise ValueError("no values were counted; the percentiles of an empty histogram are undefined")
        cumulative = np.cumsum(self.counts)
        out = []
        for q in qs:
            rank = q / 100.0 * (total - 1)  # 0-based rank numpy interpolates at
            below = math.floor(rank)
            lower = self._value_at(below, cumulative)
            upper = self._value_at(min(below + 1, total - 1), cumulative)
            out.append(lower + (rank - below) * (upper - lower))
        return out

    def _value_at(self, rank: int, cumulative: np.ndarray) -> float:
        """The value of 0-based rank `rank`, spread evenly within its bin."""
        index = min(int(np.searchsorted(cumulative, rank, side="right")), self.bins - 1)
        before = int(cumulative[index - 1]) if index > 0 else 0
        inside = (rank - before + 0.5) / max(int(self.counts[index]), 1)
        return self.origin + self.width * (index + min(max(inside, 0.0), 1.0))

    def rebinned(self, *, bins: int, low: float, high: float, scale: float = 1.0, shift: float = 0.0) -> list[int]:
        """Counts over `bins` equal bins of [low, high] of the values mapped by v * scale + shift, the tails clipped
        into the end bins (the report's histograms); each fine bin counts at its centre."""
        centres = (self.edges[:-1] + self.width / 2) * scale + shift
        top = high if high > low else low + 1.0
        index = np.floor((np.clip(centres, low, top) - low) / (top - low) * bins).astype(np.int64)
        return [int(c) for c in np.bincount(np.clip(index, 0, bins - 1), weights=self.counts, minlength=bins)]


class StreamedChannel:
    """Everything the site-level modes need from one channel's foreground, merged volume by volume."""

    def __init__(self, *, settings: NormalizationConfig, landmarks: bool) -> None:
        self.settings = settings
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.histogram = StreamedHistogram()
        self.landmark_sum = np.zeros(len(settings.landmarks)) if landmarks else None
        self.landmark_volumes = 0
        self.flat_volumes = 0

    def add(self, channel: torch.Tensor) -> None:
        """One volume's channel (spatial axes only, or with a leading channel axis of 1)."""
        values = _foreground_values(channel, foreground_mask(channel, rule=self.settings.foreground))
        n = values.size
        volume_mean = float(values.mean())
        volume_m2 = float(((values - volume_mean) ** 2).sum())
        delta = volume_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += volume_m2 + delta * delta * self.count * n / total
        self.count = total
        self.histogram.add(values)
        if self.landmark_sum is not None:
            marks = np.percentile(values, self.settings.landmarks)
            span = marks[-1] - marks[0]
            if span > 0:  # a flat volume carries no histogram shape (as in the fixed grid's fit)
                self.landmark_sum += (marks - marks[0]) / span
                self.landmark_volumes += 1
            else:
                self.flat_volumes += 1

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def mean_landmarks(self) -> list[float] | None:
        if self.landmark_sum is None or self.landmark_volumes == 0:
            return None
        # Rounding can leave a hair of disorder where neighbouring landmarks coincide.
        return [float(v) for v in np.maximum.accumulate(self.landmark_sum / self.landmark_volumes)]
