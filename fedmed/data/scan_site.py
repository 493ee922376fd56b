"""A site's cases in scan geometry: validated once, preprocessed lazily, cached within a bound.

Nothing here holds a whole site in memory. Training draws random patches from a MONAI dataset whose
cache keeps at most `data.max_cached_cases` preprocessed cases in RAM (`data.cache = "memory"`), or
all of them on disk in the site's own folder (`"disk"`), or none. Validation cases are whole volumes
that keep the record of their preprocessing, so predictions can be inverted onto the original grid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from fedmed.config import InferenceConfig, RunConfig
from fedmed.core.log import logger

from .manifest import MANIFEST_NAME, Case, parse_manifest
from .problems import DataValidationError
from .report import ValidationReport, raise_if_errors
from .tuning import cross_validates, tuning_split
from .validation import iter_site_cases

if TYPE_CHECKING:
    from .normalization.scan_stats import ScanIntensityStats
    from .scans import SiteIntensityd

Record = dict[str, Any]


def case_record(case: Case) -> Record:
    """What MONAI's LoadImaged reads: one path per modality (stacked as channels) and the label path."""
    images = [str(path) for path in case.images]
    record: Record = {"image": images if len(images) > 1 else images[0], "case": case.image.name}
    if isinstance(case.label, Path):
        record["label"] = str(case.label)
    # Part of the disk cache's key: a file replaced under the same name is preprocessed again.
    files = [*case.images, *([case.label] if isinstance(case.label, Path) else [])]
    record["stamp"] = [f"{stat.st_size}-{stat.st_mtime_ns}" for stat in (Path(path).stat() for path in files)]
    return record


def preprocessing_fingerprint(config: RunConfig) -> str:
    """Changes whenever the deterministic preprocessing would; names the disk cache folder."""
    task = config.task
    relevant = {
        "spacing": task.spacing,
        "orientation": task.orientation,
        "crop_foreground": task.crop_foreground,
        "intensity": task.intensity,
        "binarize_labels": task.binarize_labels,
        "normalization": config.normalization.model_dump(mode="json"),
        "kind": task.kind,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class PatchDataset(Dataset):
    """Random training patches: item i is one patch of case i // samples_per_volume, a dict of image (and label) tensors
    (image only for enhancement). One patch per item keeps DP-SGD's unit one case per draw."""

    def __init__(self, source: Dataset, *, num_cases: int, samples_per_volume: int, labelled: bool) -> None:
        self.source = source
        self.num_cases = num_cases
        self.samples_per_volume = samples_per_volume
        self.labelled = labelled

    def __len__(self) -> int:
        return self.num_cases * self.samples_per_volume

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        drawn = self.source[index // self.samples_per_volume]
        patch = drawn[0] if isinstance(drawn, list) else drawn
        sample = {"image": _plain(patch["image"]).float().contiguous()}
        if self.labelled:
            sample["label"] = _plain(patch["label"]).to(torch.int64).contiguous()
        return sample

    def set_random_state(self, seed: int) -> None:
        """Reproducible patches and augmentations for a given round (and each DataLoader worker)."""
        source = self.source.dataset if isinstance(self.source, Subset) else self.source  # a tuning split's rest
        transform = getattr(source, "transform", None)
        if transform is not None and hasattr(transform, "set_random_state"):
            transform.set_random_state(seed=seed % (2**32))


class PooledPatches(ConcatDataset):
    """Several sites' patch datasets as one (the pooled baseline)."""

    def set_random_state(self, seed: int) -> None:
        for offset, dataset in enumerate(self.datasets):
            dataset.set_random_state(seed + offset)


def pooled_training_set(sets: list[Any]) -> Any:
    """One training set over several sites: a list of samples (grid geometry) or pooled patch datasets."""
    if all(isinstance(dataset, PatchDataset) for dataset in sets):
        return PooledPatches(sets)
    return [sample for dataset in sets for sample in dataset]


@dataclass
class VolumeCases:
    """Whole validation volumes, preprocessed, each with the record of how (for inverting predictions)."""

    dataset: Dataset
    records: list[Record]
    preprocessing: Any  # the Compose that produced them; Invertd undoes its geometric steps
    reference_intensity: list[Any]  # enhancement: the same normalization applied on the original grid
    roi_size: list[int]
    inference: InferenceConfig

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.dataset[index]


@dataclass
class ScanSite:
    """A site's data in scan geometry; `train` yields patches, `val` whole preprocessed volumes."""

    name: str
    train: PatchDataset
    val: VolumeCases
    source: Path
    channels: int
    # With fine-tuning or Ditto: the site's own model trains on personal_train, and tune (the rest of the training
    # cases) stops the fine-tune and chooses the delivered model; the federation trains on every training case.
    personal_train: PatchDataset | None = None
    tune: VolumeCases | None = None
    # Training patches of the cases at some indices and whole volumes of others: a small site's cross-validation folds.
    split_training: Callable[[list[int], list[int]], tuple[PatchDataset, VolumeCases]] | None = None
    # The training cases whole, as validation and `fedmed predict` see a case (never cached: read once, at the end
    # of a run, for the out-of-distribution reference of the model card).
    train_volumes: VolumeCases | None = None
    # Site-level intensity modes: the step every pipeline of the site shares, the training volumes as the caches hold
    # them (resampled, in scanner units) for the one streamed pass that fits its statistics, and what identifies them.
    intensity: SiteIntensityd | None = None
    unnormalized_train: Dataset | None = None
    intensity_key: str = ""

    @property
    def num_train(self) -> int:
        return self.train.num_cases

    def training_volumes(self) -> Iterator[torch.Tensor]:
        """The training cases' images one at a time, resampled but not normalized (read through the disk cache when
        it holds them, else preprocessed once): what the site's statistics are fitted on."""
        if self.unnormalized_train is None:
            raise ValueError(f"site '{self.name}': task.intensity is not a site-level mode; nothing to fit")
        for index in range(self.num_train):
            yield _plain(self.unnormalized_train[index]["image"])

    def use_intensity(self, stats: ScanIntensityStats, *, standard_landmarks: list[float] | None = None) -> None:
        """Normalize every case (training patches, tuning and validation volumes) with these statistics from now on."""
        if self.intensity is None:
            raise ValueError(f"site '{self.name}': task.intensity is not a site-level mode; no statistics to use")
        self.intensity.use(stats, standard_landmarks=standard_landmarks)

    @property
    def num_val(self) -> int:
        return len(self.val)


def open_scan_site(path: Path, *, config: RunConfig, cache_dir: Path | None, check_only: bool = False) -> ScanSite:
    """Validate every case (each file read once), then build datasets that preprocess each case when first read.
    `check_only`: opened to check the data (and count channels), never cached; the site's session caches."""
    # scans imports MONAI: loaded when a scan-geometry site opens, so that importing fedmed.data stays cheap.
    from .scans import SiteIntensityd, preprocessing, training_transform

    if check_only:
        config = config.model_copy(update={"data": config.data.model_copy(update={"cache": "none"})})
        cache_dir = None
    path, name, splits, channels = _checked_records(path, config=config)
    task, data = config.task, config.data
    train_records, val_records = splits["training"], splits["validation"]
    fingerprint = preprocessing_fingerprint(config)
    step = SiteIntensityd(method=task.intensity, settings=config.normalization) if _site_level(config) else None
    training = training_transform(task, config.train, config.normalization, site_step=step)
    train_source = _dataset(
        train_records,
        transform=training,
        cache=data.cache,
        cache_num=min(len(train_records), data.max_cached_cases),
        cache_dir=cache_dir,
        fingerprint=fingerprint,
        workers=config.data.workers,
    )
    whole = preprocessing(task, config.normalization, with_label=False, site_step=step)

    def volumes(records: list[Record], *, cache: str = "none", cache_num: int = 0) -> VolumeCases:
        # Read in the site's own process, each keeping the record of its preprocessing that Invertd needs.
        dataset = _dataset(
            records,
            transform=whole,
            cache=cache,
            cache_num=cache_num,
            cache_dir=cache_dir if cache != "none" else None,
            fingerprint=fingerprint + "-val",
            workers=0,
            keep_meta=True,
        )
        return _volume_cases(records, dataset, preprocessing=whole, config=config, site_step=step)

    val = volumes(
        val_records,
        cache=data.cache,
        cache_num=max(0, min(len(val_records), data.max_cached_cases - len(train_records))),
    )
    # One line per site about its cache: the cache its session uses, and why (a check-only open, whose caller
    # reports the counts, names none and says it at debug level).
    cache = "checked" if check_only else _cache_in_use(config, cache_dir, fingerprint, splits=splits)
    (logger.debug if check_only else logger.info)(
        "site '%s': %s (%d channels), %s", name, _counts(splits), channels, cache
    )
    # Site-level modes: the training volumes before their intensity step, for the pass that fits the statistics.
    unnormalized = None if step is None else _unnormalized(train_records, training, config, cache_dir=cache_dir)

    def split_training(kept: list[int], held: list[int]) -> tuple[PatchDataset, VolumeCases]:
        return _patches(Subset(train_source, kept), len(kept), config=config), volumes(
            [train_records[i] for i in held], cache=data.cache
        )

    personal_train, tune = None, None
    if config.evaluation.personal_training and not cross_validates(len(train_records), evaluation=config.evaluation):
        personal_train, tune = split_training(
            *tuning_split(len(train_records), fraction=config.evaluation.tuning_fraction, seed=config.seed, site=name)
        )
    return ScanSite(
        name=name,
        train=_patches(train_source, len(train_records), config=config),
        val=val,
        source=path,
        channels=channels,
        personal_train=personal_train,
        tune=tune,
        split_training=split_training,
        train_volumes=volumes(train_records),  # never cached: read once, for the model card's reference
        intensity=step,
        unnormalized_train=unnormalized,
        intensity_key="" if step is None else _intensity_key(train_records, config),
    )


def _site_level(config: RunConfig) -> bool:
    from .normalization.scan_stats import STREAMED_MODES

    return config.task.intensity in STREAMED_MODES


def _unnormalized(records: list[Record], training: Any, config: RunConfig, *, cache_dir: Path | None) -> Dataset:
    """The training volumes up to the site-level intensity step. With the disk cache, the training dataset's own
    cached steps on the same files: a case preprocessed for training is read back, and one read here first is
    cached for training (MONAI names a cached case by its record alone)."""
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import Compose

    from .scans import SiteIntensityd, preprocessing

    if config.data.cache == "disk" and cache_dir is not None:
        steps = list(training.transforms)
        cached = Compose(steps[: next(i for i, step in enumerate(steps) if isinstance(step, SiteIntensityd))])
        fingerprint = preprocessing_fingerprint(config)
        return _dataset(
            records,
            transform=cached,
            cache="disk",
            cache_num=0,
            cache_dir=cache_dir,
            fingerprint=fingerprint,
            workers=0,
        )
    # Without a disk cache each case is loaded and resampled once, image only.
    image_only = preprocessing(config.task, config.normalization, with_label=False).transforms
    return MonaiDataset(
        records, transform=Compose([step for step in image_only if not isinstance(step, SiteIntensityd)])
    )


def _intensity_key(records: list[Record], config: RunConfig) -> str:
    """Names the fitted statistics: the same training files, preprocessed the same way, fitted the same way."""
    files = [[record["image"], record["stamp"]] for record in records]
    named = json.dumps([preprocessing_fingerprint(config), files], sort_keys=True)
    return hashlib.sha256(named.encode()).hexdigest()[:16]


def _patches(source: Dataset, num_cases: int, *, config: RunConfig) -> PatchDataset:
    return PatchDataset(
        source,
        num_cases=num_cases,
        samples_per_volume=config.train.samples_per_volume,
        labelled=config.task.kind == "segmentation",
    )


def _volume_cases(
    records: list[Record], dataset: Dataset, *, preprocessing: Any, config: RunConfig, site_step: Any = None
) -> VolumeCases:
    from .scans import intensity_transform

    return VolumeCases(
        dataset=dataset,
        records=records,
        preprocessing=preprocessing,
        reference_intensity=intensity_transform(config.task, config.normalization, site_step=site_step),
        roi_size=config.roi_size,
        inference=config.inference,
    )


def _checked_records(path: Path, *, config: RunConfig) -> tuple[Path, str, dict[str, list[Record]], int]:
    """(site folder, site name, records per split, channels): every case validated, each file read once."""
    path = Path(path)
    if path.name == MANIFEST_NAME:
        path = path.parent
    manifest, problems = parse_manifest(path)
    report = ValidationReport(path=path, problems=list(problems))
    if manifest is None:
        raise DataValidationError(report.problems, context=f"site data at {path}")
    splits: dict[str, list[Record]] = {"training": [], "validation": []}
    channels = 0
    for checked in iter_site_cases(manifest, task=config.task, report=report):
        channels = int(checked.image.shape[0])
        splits[checked.split].append(case_record(checked.case))
    raise_if_errors(report, context=f"site '{manifest.name}' at {path}")
    return path, manifest.name, splits, channels


def _dataset(
    records: list[Record],
    *,
    transform: Any,
    cache: str,
    cache_num: int,
    cache_dir: Path | None,
    fingerprint: str,
    workers: int,
    keep_meta: bool = False,
) -> Dataset:
    # MONAI loads in seconds: imported when a site's datasets are built, not with fedmed.data.
    from monai.data import CacheDataset, PersistentDataset
    from monai.data import Dataset as MonaiDataset

    if cache == "disk" and cache_dir is not None:
        # Preprocessed patient images: readable by the site's own account only, like the images' state folder.
        folder = Path(cache_dir) / fingerprint
        for level in (Path(cache_dir), folder):
            level.mkdir(parents=True, exist_ok=True, mode=0o700)
            level.chmod(0o700)
        # MONAI drops MetaTensor metadata from the disk cache unless asked; the files are this site's own.
        return PersistentDataset(
            records, transform=transform, cache_dir=folder, track_meta=keep_meta, weights_only=not keep_meta
        )
    if cache == "memory" and cache_num > 0:
        # Filled on first use of each case, so opening a site costs nothing up front; DataLoader workers
        # would each fill (and drop) a copy of their own, so with workers the cache is filled here.
        return CacheDataset(
            records, transform=transform, cache_num=cache_num, progress=False, runtime_cache=workers == 0
        )
    return MonaiDataset(records, transform=transform)


def _counts(splits: dict[str, list[Record]]) -> str:
    return f"{len(splits['training'])} training and {len(splits['validation'])} validation cases"


def _cache_in_use(config: RunConfig, cache_dir: Path | None, fingerprint: str, *, splits: dict[str, list]) -> str:
    """The cache the datasets use, and why; for the disk cache, how much of it an earlier run filled."""
    data = config.data
    cases = sum(map(len, splits.values()))
    if data.cache == "disk" and cache_dir is not None:
        folders = [Path(cache_dir) / fingerprint, Path(cache_dir) / f"{fingerprint}-val"]
        ready = min(cases, sum(1 for folder in folders if folder.is_dir() for _ in folder.glob("*.pt")))
        rest = "" if ready >= cases else "; the first round preprocesses the rest"
        return f"cache disk in {cache_dir} ({ready} of {cases} cases preprocessed already{rest})"
    if data.cache == "disk":
        return "cache none (data.cache = disk, but no cache folder was given)"
    if data.cache == "memory":
        return f"cache memory (up to {data.max_cached_cases} cases, data.max_cached_cases, filled as first read)"
    return "cache none (data.cache = none: every read preprocesses again)"


def _plain(tensor: Any) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
