"""Scan geometry: MONAI dictionary-transform pipelines for volumes at native size, as MONAI's recipes build them.

Preprocessing is deterministic and invertible where geometry changes (Orientationd, Spacingd,
CropForegroundd), so a prediction made on the resampled grid goes back to the original image's grid
with `Invertd`. Training adds random patch sampling and augmentations after it; dataset caches keep
only the deterministic part.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import MapTransform

from fedmed.config import AugmentationConfig, NormalizationConfig, TaskConfig, TrainConfig

from .normalization.scan_stats import STREAMED_MODES, ScanIntensityStats
from .preprocess import AXIS_LABELS


def _transforms() -> Any:
    import monai.transforms

    return monai.transforms


class MapLabelsd(MapTransform):
    """Label maps to integer classes: every value > 0 becomes 1 (binarize) or values are rounded.

    A MONAI transform, not a lambda: dataset caches keep its output, and pipelines pickle into workers."""

    def __init__(self, keys: tuple[str, ...], *, binarize: bool) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.binarize = binarize

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            label = out[key]
            out[key] = ((label > 0) if self.binarize else torch.round(label)).to(torch.uint8)
        return out


class SiteIntensityd:
    """The site's own statistics (site_zscore, site_percentile) or the federation's Nyúl landmarks, per channel.

    Deliberately not a MONAI Transform: MONAI's dataset caches stop before the first step that is not one, so the
    disk and memory caches keep the resampled volumes in scanner units and refitted statistics (or new landmarks)
    apply without preprocessing any case again. The statistics are set once the site has fitted them
    (`use`); the pipelines that share this step all see them."""

    def __init__(self, *, method: str, settings: NormalizationConfig) -> None:
        self.method = method
        self.settings = settings
        self.stats: ScanIntensityStats | None = None
        self.standard_landmarks: list[float] | None = None

    def use(self, stats: ScanIntensityStats, *, standard_landmarks: list[float] | None) -> None:
        if stats.method != self.method:
            raise ValueError(
                f"the site's intensity statistics were fitted for {stats.method}, not task.intensity '{self.method}'; "
                f"delete the site's normalization.json so it refits them"
            )
        per_channel = len(self.settings.landmarks)
        if self.method == "nyul" and (
            standard_landmarks is None or len(standard_landmarks) != per_channel * len(stats.channels)
        ):
            found = "none" if standard_landmarks is None else f"{len(standard_landmarks)} values"
            raise ValueError(
                f"nyul needs the federation's standard landmarks, {per_channel} per channel for "
                f"{len(stats.channels)} channel(s), but got {found}; the coordinator sends them after every site "
                f"shared its landmarks (coordinator and sites must run the same fedmed and run config)"
            )
        self.stats, self.standard_landmarks = stats, standard_landmarks

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from .normalization import normalize_image

        if self.stats is None:
            raise ValueError(
                f"task.intensity '{self.method}' needs the site's statistics, streamed over its training cases "
                f"before any case is normalized; open the site through its session (fedmed.site) or call "
                f"ScanSite.use_intensity first"
            )
        out = dict(data)
        image = out["image"]
        if image.shape[0] != len(self.stats.channels):
            raise ValueError(
                f"case {out.get('case', '?')} has {image.shape[0]} channel(s) but the site's statistics have "
                f"{len(self.stats.channels)}; every case must list the same modalities"
            )
        block = len(self.settings.landmarks)
        normalized = image.clone().float()  # keeps a MetaTensor's record of its preprocessing (Invertd needs it)
        for c, stats in enumerate(self.stats.channels):
            standard = None if self.standard_landmarks is None else self.standard_landmarks[c * block : (c + 1) * block]
            plain = image[c].as_tensor() if hasattr(image, "as_tensor") else image[c]
            normalized[c] = normalize_image(
                plain, method=self.method, stats=stats, standard_landmarks=standard, settings=self.settings
            )
        out["image"] = normalized
        return out


def intensity_transform(
    task: TaskConfig, normalization: NormalizationConfig, *, site_step: SiteIntensityd | None = None
) -> list[Any]:
    """Per-image, per-channel intensity normalization of the "image" key (or a fixed CT window); for the site-level
    modes, `site_step` (or a fresh one that refuses to run until given the site's statistics)."""
    t = _transforms()
    mode = task.intensity
    if mode in STREAMED_MODES:
        return [site_step or SiteIntensityd(method=mode, settings=normalization)]
    if mode == "zscore":
        return [t.NormalizeIntensityd(keys="image", nonzero=normalization.foreground == "nonzero", channel_wise=True)]
    if mode == "percentile":
        low, high = normalization.percentiles
        return [
            t.ScaleIntensityRangePercentilesd(
                keys="image", lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            )
        ]
    if mode == "minmax":
        return [t.ScaleIntensityd(keys="image", minv=0.0, maxv=1.0, channel_wise=True)]
    if mode == "ct_window":
        half = normalization.window_width / 2
        return [
            t.ScaleIntensityRanged(
                keys="image",
                a_min=normalization.window_level - half,
                a_max=normalization.window_level + half,
                b_min=0.0,
                b_max=1.0,
                clip=True,
            )
        ]
    if mode == "none":
        return []
    raise ValueError(f"task.intensity '{mode}' is not available with scan geometry")


def preprocessing(
    task: TaskConfig, normalization: NormalizationConfig, *, with_label: bool, site_step: SiteIntensityd | None = None
) -> Any:
    """Load → channel first → reorient → resample to task.spacing → optional foreground crop → normalize (the
    site-level modes last, after the cached steps)."""
    t = _transforms()
    keys = ("image", "label") if with_label else ("image",)
    modes = ("bilinear", "nearest")[: len(keys)]
    steps: list[Any] = [
        t.LoadImaged(keys=keys, image_only=True, ensure_channel_first=True, reader="NibabelReader"),
        t.EnsureTyped(keys="image", dtype=torch.float32, track_meta=True),
        t.Orientationd(keys=keys, axcodes=task.orientation, labels=AXIS_LABELS),
        t.Spacingd(keys=keys, pixdim=task.spacing, mode=modes),
    ]
    if task.crop_foreground:
        steps.append(t.CropForegroundd(keys=keys, source_key="image", allow_smaller=True, margin=2))
    site_level = task.intensity in STREAMED_MODES
    if not site_level:
        steps += intensity_transform(task, normalization)
    if with_label and task.kind == "segmentation":
        steps.append(MapLabelsd(("label",), binarize=task.binarize_labels))
    if site_level:
        steps += intensity_transform(task, normalization, site_step=site_step)
    return t.Compose(steps)


def patch_sampling(task: TaskConfig, train: TrainConfig) -> list[Any]:
    """One random training patch per draw (a list of one dict, as MONAI's croppers return)."""
    t = _transforms()
    patch = list(train.patch_size or [])
    labelled = task.kind == "segmentation"
    keys = ("image", "label") if labelled else ("image",)
    steps: list[Any] = [t.SpatialPadd(keys=keys, spatial_size=patch)]
    if labelled and train.sampling == "pos_neg":
        steps.append(
            t.RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=patch,
                pos=train.positive_fraction,
                neg=1.0 - train.positive_fraction,
                num_samples=1,
                allow_smaller=True,
            )
        )
    elif labelled and train.sampling == "classes":
        steps.append(
            t.RandCropByLabelClassesd(
                keys=keys,
                label_key="label",
                spatial_size=patch,
                num_classes=task.num_classes,
                num_samples=1,
                allow_smaller=True,
            )
        )
    else:
        steps.append(t.RandSpatialCropd(keys=keys, roi_size=patch, random_size=False))
    return steps


def augmentations(
    augmentation: AugmentationConfig, *, spatial_dims: int, keys: tuple[str, ...], flips: bool = True
) -> list[Any]:
    """MONAI random augmentations as configured; `keys[1:]` are label maps (nearest-neighbour)."""
    t = _transforms()
    spatial_modes = ("bilinear", *(("nearest",) * (len(keys) - 1)))
    probability = augmentation.probability
    steps: list[Any] = []
    if flips and augmentation.flips:
        steps += [t.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    if augmentation.rotate_degrees:
        angle = math.radians(augmentation.rotate_degrees)
        ranges = {"range_x": angle} if spatial_dims == 2 else {"range_x": angle, "range_y": angle, "range_z": angle}
        steps.append(t.RandRotated(keys=keys, prob=probability, mode=spatial_modes, padding_mode="zeros", **ranges))
    if augmentation.scale:
        zoom_modes = ("bilinear" if spatial_dims == 2 else "trilinear", *(("nearest",) * (len(keys) - 1)))
        steps.append(
            t.RandZoomd(
                keys=keys,
                prob=probability,
                min_zoom=1.0 - augmentation.scale,
                max_zoom=1.0 + augmentation.scale,
                mode=zoom_modes,
                keep_size=True,
            )
        )
    if augmentation.intensity_scale:
        steps.append(t.RandScaleIntensityd(keys="image", factors=augmentation.intensity_scale, prob=probability))
    if augmentation.intensity_shift:
        steps.append(t.RandShiftIntensityd(keys="image", offsets=augmentation.intensity_shift, prob=probability))
    if augmentation.gamma:
        gamma = (1.0 - augmentation.gamma, 1.0 + augmentation.gamma)
        # Gamma needs non-negative input; MONAI rescales to [0, 1] and back around it (retain_stats).
        steps.append(t.RandAdjustContrastd(keys="image", gamma=gamma, prob=probability, retain_stats=True))
    return steps


def training_transform(
    task: TaskConfig,
    train: TrainConfig,
    normalization: NormalizationConfig,
    *,
    site_step: SiteIntensityd | None = None,
) -> Any:
    """Preprocessing (cacheable) followed by patch sampling and augmentations (random every draw)."""
    t = _transforms()
    labelled = task.kind == "segmentation"
    keys = ("image", "label") if labelled else ("image",)
    random_steps = patch_sampling(task, train)
    if train.augment:
        random_steps += augmentations(train.augmentation, spatial_dims=task.spatial_dims, keys=keys)
    steps = preprocessing(task, normalization, with_label=labelled, site_step=site_step).transforms
    return t.Compose([*steps, *random_steps])
