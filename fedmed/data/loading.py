"""Load a site into memory, preprocessed and ready for training.

Loading validates as it reads (each file once) and refuses the site with every problem listed. The
in-process federation engine calls `load_site` every round, so results are cached per process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmed.config import TaskConfig
from fedmed.core.log import logger

from .case_check import CheckedCase
from .fixed_grid import to_model_grid
from .manifest import MANIFEST_NAME, parse_manifest
from .npz import NPZ_SPLITS, check_npz_site, is_npz_site, parse_npz_site
from .preprocess import (
    PER_IMAGE_MODES,
    map_labels,
    normalize_intensity,
    resize_image,
    resize_label,
    squeeze_spatial,
    to_ras,
)
from .problems import DataValidationError
from .report import ValidationReport, raise_if_errors
from .validation import iter_site_cases

Sample = dict[str, torch.Tensor]
# Enough for every site of a large simulated federation; older entries go first.
_CACHE_LIMIT = 1024


@dataclass
class SiteData:
    """A site's preprocessed samples. Tensors are shared with the process cache: do not modify them in place."""

    name: str
    train: list[Sample]
    val: list[Sample]
    source: Path | None = None

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return len(self.val)

    def copy(self) -> SiteData:
        # New lists, so a caller shuffling or filtering them never changes what the cache hands out next.
        return SiteData(name=self.name, train=list(self.train), val=list(self.val), source=self.source)


_cache: OrderedDict[tuple[Any, ...], SiteData] = OrderedDict()
_cache_lock = threading.Lock()


def clear_site_cache() -> None:
    with _cache_lock:
        _cache.clear()


def load_site(path: Path, *, task: TaskConfig, cache: bool = True) -> SiteData:
    """Load a site folder (dataset.json) or an .npz site; raises DataValidationError listing every problem.

    `cache=False`: neither read from nor kept in the process cache (data read once, e.g. pretraining phantoms)."""
    path = Path(path)
    if path.name == MANIFEST_NAME:
        path = path.parent
    key = _cache_key(path, task) if cache else None
    if key is not None:
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached.copy()
    site = _load_npz(path, task=task) if is_npz_site(path) else _load_folder(path, task=task)
    logger.info("loaded site '%s' from %s: %d train, %d val", site.name, path, site.num_train, site.num_val)
    if key is not None:
        with _cache_lock:
            _cache[key] = site
            while len(_cache) > _CACHE_LIMIT:
                _cache.popitem(last=False)
    return site.copy()


def _cache_key(path: Path, task: TaskConfig) -> tuple[Any, ...] | None:
    manifest = path if is_npz_site(path) else path / MANIFEST_NAME
    try:
        stat = manifest.stat()
    except OSError:
        return None  # nothing to cache; loading will report the missing file
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, task.model_dump_json())


def _load_folder(path: Path, *, task: TaskConfig) -> SiteData:
    manifest, problems = parse_manifest(path)
    report = ValidationReport(path=path, problems=list(problems))
    if manifest is None:
        raise DataValidationError(report.problems, context=f"site data at {path}")
    splits: dict[str, list[Sample]] = {"training": [], "validation": []}
    for checked in iter_site_cases(manifest, task=task, report=report):
        if report.ok:  # once the site is refused, keep scanning for problems but skip the preprocessing
            splits[checked.split].append(preprocess_case(checked, task=task))
    raise_if_errors(report, context=f"site '{manifest.name}' at {path}")
    return SiteData(name=manifest.name, train=splits["training"], val=splits["validation"], source=path)


def per_image_intensity(task: TaskConfig) -> str:
    """The normalization applied while loading; site-level modes start from the raw intensities and are
    applied by fedmed.data.normalization once the site's statistics are known."""
    return task.intensity if task.intensity in PER_IMAGE_MODES else "none"


def preprocess_case(checked: CheckedCase, *, task: TaskConfig) -> Sample:
    """A checked case on the task's grid; a multi-modal image stays C-channel (reoriented, resized and
    normalized per channel, all channels on one grid)."""
    # The image goes the way `fedmed predict` and exported bundles send new images (fedmed.data.fixed_grid).
    image, _ = to_model_grid(
        checked.image, spatial_dims=task.spatial_dims, image_size=task.image_size, intensity=per_image_intensity(task)
    )
    label: Any = checked.label
    if task.kind == "segmentation":
        label = to_ras(label) if task.spatial_dims == 3 else squeeze_spatial(label, spatial_dims=2)
    sample: Sample = {"image": image}
    if task.kind == "segmentation":
        mapped = map_labels(_plain(label), binarize=task.binarize_labels)
        sample["label"] = _plain(resize_label(mapped, task.image_size)).to(torch.int64).contiguous()
    elif task.kind == "classification":
        sample["label"] = torch.tensor(int(label), dtype=torch.int64)
    return sample


def _load_npz(path: Path, *, task: TaskConfig) -> SiteData:
    site, problems = parse_npz_site(path)
    if site is None:
        raise DataValidationError(problems, context=f"npz site at {path}")
    report = ValidationReport(path=path, problems=list(problems))
    check_npz_site(site, task=task, report=report)
    raise_if_errors(report, context=f"npz site at {path}")
    splits: dict[str, list[Sample]] = {}
    for split in NPZ_SPLITS:
        images, labels = site.split(split)
        # N images as N channels: one resize and one normalisation call for the whole split.
        stack = torch.from_numpy(images.astype("float32", copy=False))
        stack = normalize_intensity(_plain(resize_image(stack, task.image_size)), mode=per_image_intensity(task))
        splits[split] = [
            {"image": stack[index : index + 1].clone(), "label": torch.tensor(int(labels[index]), dtype=torch.int64)}
            for index in range(len(images))
        ]
    return SiteData(name=site.name, train=splits["training"], val=splits["validation"], source=path)


def _plain(tensor: Any) -> torch.Tensor:
    """Drop MONAI metadata: samples travel through DataLoaders and Opacus as plain tensors."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
