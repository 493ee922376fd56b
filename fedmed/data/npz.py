"""MedMNIST-style `.npz` sites for classification: one file holds every image of the site.

Keys: train_images, train_labels, val_images, val_labels (test_* are ignored); images (N, H, W) or
(N, D, H, W), labels (N,) or (N, 1) integer classes.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.config import TaskConfig

from .problems import DataProblem, DataValidationError, errors_in
from .report import ValidationReport

NPZ_SPLITS = {"training": "train", "validation": "val"}
REQUIRED_KEYS = ("train_images", "train_labels", "val_images", "val_labels")


@dataclass(frozen=True)
class NpzSite:
    name: str
    source: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        prefix = NPZ_SPLITS[split]
        return getattr(self, f"{prefix}_images"), getattr(self, f"{prefix}_labels")


def is_npz_site(path: Path) -> bool:
    return Path(path).suffix.lower() == ".npz"


def read_npz_site(path: Path) -> NpzSite:
    """Read and structurally check an .npz site; raises DataValidationError with every problem."""
    site, problems = parse_npz_site(Path(path))
    if site is None or errors_in(problems):
        raise DataValidationError(problems, context=str(path))
    return site


def parse_npz_site(path: Path) -> tuple[NpzSite | None, list[DataProblem]]:
    where = str(path)
    if not path.is_file():
        return None, [DataProblem(where, "npz site file not found", "check the site path in the config")]
    try:
        with np.load(path, allow_pickle=False) as archive:
            # Materialise now: each array is decompressed exactly once and the file handle is released.
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        return None, [
            DataProblem(
                where,
                f"cannot be read as a NumPy .npz archive ({type(error).__name__}: {error})",
                "re-create it with numpy.savez_compressed (object arrays are not allowed)",
            )
        ]
    problems: list[DataProblem] = []
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        problems.append(
            DataProblem(
                where,
                f"missing key(s) {', '.join(missing)} (found: {', '.join(sorted(arrays)) or 'none'})",
                "save the arrays under train_images, train_labels, val_images, val_labels (MedMNIST names)",
            )
        )
        return None, problems
    labels: dict[str, np.ndarray] = {}
    for prefix in NPZ_SPLITS.values():
        images, raw_labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if raw_labels.ndim == 2 and raw_labels.shape[1] == 1:
            raw_labels = raw_labels[:, 0]
        if raw_labels.ndim != 1:
            problems.append(
                DataProblem(
                    where,
                    f"{prefix}_labels has shape {raw_labels.shape}; multi-label targets are not supported",
                    "store one integer class per image, shape (N,) or (N, 1)",
                )
            )
        elif len(raw_labels) != len(images):
            problems.append(
                DataProblem(
                    where,
                    f"{prefix}_images has {len(images)} images but {prefix}_labels has {len(raw_labels)} labels",
                    f"store exactly one label per image in {prefix}_labels",
                )
            )
        if images.ndim not in (3, 4):
            problems.append(
                DataProblem(
                    where,
                    f"{prefix}_images has shape {images.shape}; expected (N, H, W) or (N, D, H, W)",
                    "store single-channel images stacked along the first axis (convert RGB to grayscale)",
                )
            )
        if len(images) == 0:
            problems.append(
                DataProblem(where, f"{prefix}_images is empty", f"put at least one image in {prefix}_images")
            )
        fractional = raw_labels.size and not np.issubdtype(raw_labels.dtype, np.integer)
        if fractional and (not np.all(np.isfinite(raw_labels)) or not np.all(raw_labels == np.round(raw_labels))):
            problems.append(
                DataProblem(where, f"{prefix}_labels holds non-integer values", "store integer class indices")
            )
        labels[prefix] = raw_labels
    if errors_in(problems):
        return None, problems
    site = NpzSite(
        name=path.stem,
        source=path.resolve(),
        train_images=arrays["train_images"],
        train_labels=labels["train"].astype(np.int64),
        val_images=arrays["val_images"],
        val_labels=labels["val"].astype(np.int64),
    )
    return site, problems


def check_npz_site(site: NpzSite, *, task: TaskConfig | None, report: ValidationReport) -> None:
    """Content checks for an .npz site (structure was checked when it was parsed)."""
    where = str(site.source)
    report.kind = "classification"
    if task is not None and task.kind != "classification":
        report.add(
            DataProblem(
                where,
                f"an .npz site holds classification data but task.kind is {task.kind}",
                "set task.kind = 'classification' or use a dataset.json site folder",
            )
        )
    for split, prefix in NPZ_SPLITS.items():
        images, labels = site.split(split)
        report.counts[split] = len(images)
        shape = tuple(int(size) for size in images.shape[1:])
        if task is not None and len(shape) != task.spatial_dims:
            report.add(
                DataProblem(
                    where,
                    f"{prefix}_images holds {len(shape)}D images of shape {shape} but task.spatial_dims is "
                    f"{task.spatial_dims}",
                    f"set task.spatial_dims = {len(shape)}, or store grayscale images as (N, H, W)",
                )
            )
        if images.dtype.kind == "f" and not np.all(np.isfinite(images)):
            report.add(
                DataProblem(where, f"{prefix}_images has NaN/Inf values", "replace them (e.g. numpy.nan_to_num)")
            )
        elif images.size:
            extremes = np.array([images.min(), images.max()], dtype=np.float64)
            report.record_image(shape, extremes, count=len(images))
        values, counts = np.unique(labels, return_counts=True)
        report.record_labels({int(value): int(count) for value, count in zip(values, counts)})
        if task is not None:
            outside = sorted(int(value) for value in values if value < 0 or value >= task.num_classes)
            if outside:
                report.add(
                    DataProblem(
                        where,
                        f"{prefix}_labels has class(es) {_short(outside)} outside [0, {task.num_classes})",
                        f"set task.num_classes = {int(values.max()) + 1}",
                    )
                )


def _short(values: list[int], limit: int = 8) -> str:
    text = ", ".join(str(value) for value in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"
