"""A site's intensity normalization: fitted from its own training images, kept in its state folder.

Only summaries leave the site: for federated harmonization (Nyúl) its mean standardized landmarks, and
for the run report a histogram of its foreground intensities before and after normalization.

In scan geometry the statistics are per channel, streamed over the training volumes once (through the disk
cache), and kept under "scan" with the key of the cases they came from: a restart, or a new run on the same
cases with the same preprocessing, reuses them without reading a volume.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.data.normalization import (
    SITE_LEVEL_MODES,
    STREAMED_MODES,
    ScanIntensityStats,
    SiteIntensityStats,
    fit_scan_stats,
    fit_site_stats,
    foreground_mask,
    intensity_histogram,
    normalize_site,
)

STATE_FILE = "normalization.json"
# The after-normalization histogram of the affine site modes spans a fixed range: one chosen from the
# normalized voxels, beside the before-histogram's range over the same voxels, would give the server the
# site's mean and std (or percentiles) exactly.
AFTER_HISTOGRAM_RANGES = {"site_zscore": (-4.0, 4.0), "site_percentile": (0.0, 1.0)}


class NormalizationStateError(FedmedError):
    """The site's normalization state is missing what the run needs, or unreadable."""


class SiteNormalization:
    """Site-level normalization for one run at one site (`task.intensity` in SITE_LEVEL_MODES)."""

    def __init__(self, *, site: str, state_dir: Path, config: RunConfig) -> None:
        self.site = site
        self.path = Path(state_dir) / STATE_FILE
        self.method = config.task.intensity
        self.settings = config.normalization
        self.site_level = self.method in SITE_LEVEL_MODES

    def fit(self, raw: Any) -> dict[str, Any]:
        """Fit and store the site's statistics from its raw training images; returns what the site shares:
        image count, standardized landmarks (Nyúl only) and the histogram of its raw intensities."""
        shared: dict[str, Any] = {"num_images": raw.num_train, "before": self.histogram(raw, raw)}
        if self.site_level:
            stats = self._fit_stats(raw)
            state = self._read() or {}
            self._write({**state, "method": self.method, "stats": stats.to_json()})
            shared["num_images"] = stats.num_images  # Nyúl leaves out flat images: they carry no landmarks
            if self.method == "nyul":
                shared["landmarks"] = list(stats.values["landmarks"])
        return shared

    def _fit_stats(self, raw: Any) -> Any:
        try:
            return fit_site_stats([sample["image"] for sample in raw.train], method=self.method, settings=self.settings)
        except ValueError as error:
            raise NormalizationStateError(f"site {self.site}: {error}") from error

    def set_standard_landmarks(self, landmarks: Sequence[float]) -> None:
        """Keep the federation's average landmarks (Nyúl) that this site maps its intensities onto."""
        state = self._read() or {}
        if state.get("standard_landmarks") != list(landmarks):
            self._write({**state, "standard_landmarks": [float(value) for value in landmarks]})

    def apply(self, raw: Any) -> Any:
        """The site's data as the model sees it; fits the site's statistics on first use."""
        if not self.site_level:
            return raw
        state = self._read()
        if state is None or state.get("method") != self.method or "stats" not in state:
            self.fit(raw)
            state = self._read() or {}
        landmarks = state.get("standard_landmarks")
        if self.method == "nyul" and landmarks is None:
            raise NormalizationStateError(
                f"site {self.site}: no federation landmarks for Nyúl harmonization in {self.path}; the coordinator "
                f"sends them at the start of the run and with every round: update fedmed at the coordinator"
            )
        try:
            stats = SiteIntensityStats.from_json(state["stats"])
            return normalize_site(
                raw, method=self.method, stats=stats, standard_landmarks=landmarks, settings=self.settings
            )
        except ValueError as error:  # a hand-edited state file, or landmarks from another run config
            raise NormalizationStateError(f"site {self.site}: {error} (state in {self.path})") from error

    def histogram(self, raw: Any, data: Any) -> dict[str, Any]:
        """Foreground histogram of `data`'s training images, on the voxels that are foreground in the raw images."""
        masks = [foreground_mask(sample["image"], rule=self.settings.foreground) for sample in raw.train]
        return intensity_histogram(
            [sample["image"] for sample in data.train],
            bins=self.settings.histogram_bins,
            rule=self.settings.foreground,
            masks=masks,
            value_range=None if data is raw else AFTER_HISTOGRAM_RANGES.get(self.method),
        )

    @property
    def streamed(self) -> bool:
        """Scan geometry fits this mode's statistics in a streamed pass (ct_window is fixed: applied per image)."""
        return self.method in STREAMED_MODES

    def describe_scans(self, site: Any) -> dict[str, Any]:
        """Scan geometry's INTENSITY_FIT: the site's statistics (fitted now unless kept for these very cases) and
        what it shares: volume count, the first channel's histograms, and for Nyúl its landmarks per channel."""
        _, shared = self._scan_stats(site)
        return dict(shared)

    def use_on_scans(self, site: Any) -> None:
        """Give a ScanSite's pipelines the site's statistics (and the federation's Nyúl landmarks)."""
        stats, _ = self._scan_stats(site)
        landmarks = (self._read() or {}).get("standard_landmarks")
        if self.method == "nyul" and landmarks is None:
            raise NormalizationStateError(
                f"site {self.site}: no federation landmarks for Nyúl harmonization in {self.path}; the coordinator "
                f"sends them at the start of the run and with every round: update fedmed at the coordinator"
            )
        try:
            site.use_intensity(stats, standard_landmarks=landmarks if self.method == "nyul" else None)
        except ValueError as error:  # landmarks from another run config, or another number of modalities
            raise NormalizationStateError(f"site {self.site}: {error} (state in {self.path})") from error

    def _scan_stats(self, site: Any) -> tuple[ScanIntensityStats, dict[str, Any]]:
        state = self._read() or {}
        kept = state.get("scan")
        if state.get("method") == self.method and isinstance(kept, dict) and kept.get("key") == site.intensity_key:
            try:
                return ScanIntensityStats.from_json(kept.get("stats")), dict(kept.get("shared") or {})
            except ValueError as error:
                logger.warning("site %s: refitting its intensity statistics: %s (%s)", self.site, error, self.path)
        try:
            stats, histograms = fit_scan_stats(site.training_volumes(), method=self.method, settings=self.settings)
        except ValueError as error:
            raise NormalizationStateError(f"site {self.site}: {error}") from error
        shared: dict[str, Any] = {"num_images": stats.num_images, **histograms}
        if self.method == "nyul":
            shared["landmarks"] = stats.landmarks
        # A fixed-grid fit ("stats") of another run must not be mistaken for this one.
        rest = {key: value for key, value in state.items() if key not in ("stats", "scan")}
        self._write(
            {
                **rest,
                "method": self.method,
                "scan": {"key": site.intensity_key, "stats": stats.to_json(), "shared": shared},
            }
        )
        logger.info("site %s: %s statistics fitted on %d training volumes", self.site, self.method, site.num_train)
        return stats, shared

    def _read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise NormalizationStateError(
                f"site {self.site}: cannot read {self.path} ({error}); delete it and the site refits its "
                f"normalization from its training images"
            ) from error

    def _write(self, state: dict[str, Any]) -> None:
        write_text_atomic(self.path, json.dumps(state, indent=1))
