"""A site's cases for one run: read, normalized as the run asks (per image, or with the site's own
statistics), checked against the run's network, and split into what the federation and the site's own
model train on and the tuning split that chooses the site's delivered model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.data import SiteData, load_site
from fedmed.data.scan_site import ScanSite, open_scan_site
from fedmed.data.tuning import choice_folds, cross_validates, tuning_split
from fedmed.site.normalization import SiteNormalization
from fedmed.site.spec import SiteSpec


class DataChannelsError(FedmedError):
    """The site's cases have another number of modalities than the run's network takes."""


class SiteCases:
    """The site's data as the run sees it; read when first used, read again after its normalization changes."""

    def __init__(self, spec: SiteSpec, config: RunConfig) -> None:
        self.spec = spec
        self.config = config
        self._landmarks_in_use: list[float] | None = None

    @cached_property
    def normalization(self) -> SiteNormalization:
        return SiteNormalization(site=self.spec.name, state_dir=self.spec.state_dir, config=self.config)

    @cached_property
    def raw_data(self) -> SiteData:
        """The site's data resampled, its intensities as the scanner wrote them (site-level modes) or
        normalized per image."""
        task = self.config.task
        if not self.normalization.site_level:
            task = task.model_copy(update={"intensity": "none"})
        return load_site(self.spec.data_path, task=task)

    @cached_property
    def data(self) -> SiteData | ScanSite:
        """The site's data as the model sees it (normalized per image or with the site's statistics); in scan
        geometry, datasets that preprocess cases when first read and cache them within data.max_cached_cases."""
        if self.config.task.scan_geometry:
            data = self._scan_site
            if self.normalization.streamed:
                self.normalization.use_on_scans(data)
        elif self.normalization.site_level:
            data = self.normalization.apply(self.raw_data)
        else:
            data = load_site(self.spec.data_path, task=self.config.task)
        self._check_channels(data)
        return data

    @cached_property
    def _scan_site(self) -> ScanSite:
        """Opened once: refitted statistics or new Nyúl landmarks apply after the caches, so nothing reopens."""
        return open_scan_site(self.spec.data_path, config=self.config, cache_dir=self.spec.preprocessed_dir)

    @cached_property
    def _split(self) -> tuple[Sequence, Sequence | None]:
        """With fine-tuning or Ditto: the training cases the site's own model trains on, and its tuning split, the
        rest (scan geometry splits on opening). The federated training uses every training case: holding a fifth
        of a small site's cases out of it cost the global model more than the choice gained
        (docs/benchmarks/every-site.md)."""
        data = self.data
        if not self.config.evaluation.personal_training or self.cross_validated:
            return data.train, None
        if getattr(data, "tune", None) is not None:  # scan geometry: split into datasets when the site was opened
            return data.personal_train, data.tune
        kept, held = tuning_split(
            len(data.train), fraction=self.config.evaluation.tuning_fraction, seed=self.config.seed, site=self.spec.name
        )
        return [data.train[i] for i in kept], [data.train[i] for i in held]

    @property
    def training_cases(self) -> Sequence:
        """What the site trains on for the federation (and its local-only baseline): every training case."""
        return self.data.train

    @property
    def personal_training_cases(self) -> Sequence:
        """What the site's own model (fine-tune, Ditto) trains on: its training cases but the tuning split."""
        return self._split[0]

    @property
    def tuning_cases(self) -> Sequence | None:
        return self._split[1]

    @property
    def cross_validated(self) -> bool:
        """A small site fine-tuning: its fine-tune and delivered model are chosen by folds over every training case."""
        return cross_validates(self.training_case_count, evaluation=self.config.evaluation)

    @property
    def training_case_count(self) -> int:
        """Training cases (not patches)."""
        data = self.data
        return data.num_train if isinstance(data, ScanSite) else len(data.train)  # scan geometry: train yields patches

    def choice_folds(self) -> list[tuple[Sequence, Sequence]]:
        """Per fold: the cases its fine-tune trains on and those it is scored on (every case is held out once)."""
        data, count = self.data, self.training_case_count
        folds = []
        for held in choice_folds(count, seed=self.config.seed, site=self.spec.name):
            kept = sorted(set(range(count)) - set(held))
            if isinstance(data, ScanSite):
                assert data.split_training is not None
                folds.append(data.split_training(kept, held))
            else:
                folds.append(([data.train[i] for i in kept], [data.train[i] for i in held]))
        return folds

    def _check_channels(self, data: SiteData | ScanSite) -> None:
        """The run's network takes task.channels inputs; a site with other modalities must not train on it."""
        found = getattr(data, "channels", None)
        if found is None and data.train:
            found = int(data.train[0]["image"].shape[0])
        if found is not None and found != self.config.task.channels:
            raise DataChannelsError(
                f"site {self.spec.name}: its images have {found} channel(s) (modalities) but the run's network takes "
                f"{self.config.task.channels}; the coordinator sets task.in_channels = {found} in the run config, or "
                f"this site lists the run's modalities in {self.spec.data_path}"
            )

    def describe_intensities(self) -> dict:
        """Fit the site's normalization; what it shares: image count, histograms, Nyúl landmarks."""
        if self.config.task.scan_geometry:
            shared = self.normalization.describe_scans(self._scan_site)
            self._forget_data()
            return shared
        shared = self.normalization.fit(self.raw_data)
        self._forget_data()  # refitted statistics: normalize again
        if self.config.task.intensity != "nyul":  # Nyúl's result needs the federation's landmarks first
            shared["after"] = self.normalization.histogram(self.raw_data, self.data)
        return shared

    def use_standard_landmarks(self, landmarks: list[float]) -> None:
        """Nyúl harmonization: map this site's intensities onto the federation's average landmarks."""
        self.normalization.set_standard_landmarks(landmarks)
        if landmarks != self._landmarks_in_use:
            self._landmarks_in_use = list(landmarks)
            self._forget_data()

    def _forget_data(self) -> None:
        for name in ("data", "_split"):
            self.__dict__.pop(name, None)

    def harmonized_histogram(self) -> dict:
        if self.config.task.scan_geometry:
            # Nyúl's mapping differs per volume: its histogram would cost one more pass; the report says not recorded.
            return {"counts": [0] * self.config.normalization.histogram_bins, "low": 0.0, "high": 0.0}
        return self.normalization.histogram(self.raw_data, self.data)
