"""Check a site's data before anything trains on it; every problem names the file and the fix.

Each file is read once. The loader reuses the same scan (`iter_site_cases`), so loading a site validates
it without reading any file twice, and validation never writes anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed.config.schema import TaskConfig

from .io import ImageReadError, WrongFileTypeError, affine_of, image_format, read_image, spatial_array
from .manifest import SPLITS, Case, Manifest, parse_manifest
from .npz import check_npz_site, is_npz_site, parse_npz_site
from .preprocess import spatial_shape_of
from .problems import DataProblem, DataValidationError, errors_in
from .report import ValidationReport, raise_if_errors

if TYPE_CHECKING:
    from monai.data import MetaTensor

__all__ = [
    "AFFINE_TOLERANCE_MM",
    "CheckedCase",
    "DataProblem",
    "DataValidationError",
    "ValidationReport",
    "check_npz_site",
    "check_site",
    "iter_site_cases",
    "raise_if_errors",
    "validate_site",
]

AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class CheckedCase:
    """A case whose files were read and passed every check."""

    split: str
    index: int
    case: Case
    image: MetaTensor
    label: MetaTensor | int | None


def validate_site(path: Path, *, task: TaskConfig | None = None) -> ValidationReport:
    """Check a site folder (dataset.json + images) or an .npz site; never raises for bad data."""
    path = Path(path)
    report = ValidationReport(path=path)
    if is_npz_site(path):
        site, problems = parse_npz_site(path)
        report.problems.extend(problems)
        if site is not None:
            check_npz_site(site, task=task, report=report)
        return report
    manifest, problems = parse_manifest(path)
    report.problems.extend(problems)
    if manifest is None:
        return report
    for _ in iter_site_cases(manifest, task=task, report=report):
        pass
    return report


def check_site(path: Path, *, task: TaskConfig | None = None) -> ValidationReport:
    """Validate and raise DataValidationError listing every error; warnings are logged."""
    report = validate_site(path, task=task)
    raise_if_errors(report, context=f"site data at {path}")
    return report


def iter_site_cases(manifest: Manifest, *, task: TaskConfig | None, report: ValidationReport) -> Iterator[CheckedCase]:
    """Read and check every case once; yield the good ones, add problems for the rest to `report`."""
    report.kind = manifest.kind
    report.counts = {split: len(getattr(manifest, split)) for split in SPLITS}
    for problem in _task_fit(manifest, task=task):
        report.add(problem)
    if errors_in(report.problems):
        return
    checker = _CaseChecker(manifest=manifest, task=task, report=report)
    for split in SPLITS:
        cases: list[Case] = getattr(manifest, split)
        for index, case in enumerate(cases):
            checked = checker.check(split=split, index=index, case=case)
            if checked is not None:
                yield checked
    checker.finish()


def _task_fit(manifest: Manifest, *, task: TaskConfig | None) -> list[DataProblem]:
    if task is None:
        return []
    where = str(manifest.source)
    kind = manifest.kind
    if task.kind == "segmentation" and kind != "segmentation":
        return [
            DataProblem(
                where,
                f"task.kind is segmentation but the cases are {kind} cases (no label file paths)",
                'give every case a "label" path to a label map, or set task.kind to match the data',
            )
        ]
    if task.kind == "classification" and kind != "classification":
        return [
            DataProblem(
                where,
                f"task.kind is classification but the cases are {kind} cases (labels are not integer classes)",
                'give every case an integer "label" class, or set task.kind to match the data',
            )
        ]
    problems: list[DataProblem] = []
    if task.kind != "enhancement" and not task.binarize_labels and manifest.labels:
        too_high = sorted(value for value in manifest.labels if value >= task.num_classes or value < 0)
        if too_high:
            problems.append(
                DataProblem(
                    where,
                    f"declares label value(s) {too_high} but task.num_classes is {task.num_classes}",
                    f"set task.num_classes = {max(manifest.labels) + 1}"
                    + (" or task.binarize_labels = true" if task.kind == "segmentation" else ""),
                    "warning",
                )
            )
    return problems


class _CaseChecker:
    def __init__(self, *, manifest: Manifest, task: TaskConfig | None, report: ValidationReport) -> None:
        self.manifest = manifest
        self.task = task
        self.report = report
        self.declared = set(manifest.labels)
        self.dims_seen: Counter[int] = Counter()
        # An enhancement task never looks at labels, so it need not read them.
        self.read_labels = task is None or task.kind != "enhancement"

    def check(self, *, split: str, index: int, case: Case) -> CheckedCase | None:
        entry = f"dataset.json {split}[{index}]"
        before = len(errors_in(self.report.problems))
        image = self._read(case.image, role="image", entry=entry)
        label: Any = None
        if self.read_labels and isinstance(case.label, Path):
            label = self._read(case.label, role="label", entry=entry)
        elif self.read_labels and isinstance(case.label, int):
            label = self._check_class(case.label, entry=entry)
        if image is not None:
            self._check_image(image, path=case.image, entry=entry)
        if image is not None and label is not None and isinstance(case.label, Path):
            self._check_label_map(label, image=image, path=case.label, image_path=case.image, entry=entry)
        if len(errors_in(self.report.problems)) > before or image is None:
            return None
        return CheckedCase(split=split, index=index, case=case, image=image, label=label)

    def finish(self) -> None:
        if self.task is None and len(self.dims_seen) > 1:
            dims = ", ".join(f"{dim}D: {count}" for dim, count in sorted(self.dims_seen.items()))
            self.report.add(
                DataProblem(
                    str(self.manifest.source),
                    f"images mix dimensionalities ({dims})",
                    "keep one dimensionality per site (2D slices or 3D volumes)",
                    "warning",
                )
            )

    def _read(self, path: Path, *, role: str, entry: str) -> MetaTensor | None:
        if image_format(path) is None:
            self.report.add(
                DataProblem(
                    str(path),
                    f"{role} file type is not supported ({entry})",
                    "convert it to NIfTI (.nii.gz) or 2D PNG",
                )
            )
            return None
        if not path.is_file():
            self.report.add(
                DataProblem(
                    str(path),
                    f"{role} file not found ({entry})",
                    f"restore the file or remove the case from {self.manifest.source}",
                )
            )
            return None
        try:
            return read_image(path)
        except WrongFileTypeError as error:
            self.report.add(
                DataProblem(
                    str(path),
                    f"{role} file is {error} ({entry})",
                    "convert it to NIfTI (.nii.gz), or give it the extension of what it is (.png for a 2D PNG)",
                )
            )
            return None
        except ImageReadError as error:
            self.report.add(
                DataProblem(
                    str(path),
                    f"{role} file is corrupt or unreadable ({error}) ({entry})",
                    f"re-export or re-copy the file (a truncated download is a common cause), or remove the case from "
                    f"{self.manifest.source.name}",
                )
            )
            return None

    def _check_image(self, image: MetaTensor, *, path: Path, entry: str) -> None:
        where = str(path)
        if image.shape[0] != 1:
            self.report.add(
                DataProblem(
                    where,
                    f"image has {image.shape[0]} channels ({entry})",
                    "fedmed models take single-channel images: keep one modality per file or convert to grayscale",
                )
            )
            return
        values = spatial_array(image)
        shape = spatial_shape_of(values.shape)
        self.dims_seen[len(shape)] += 1
        self.report.record_image(shape, values)
        if self.task is not None and len(shape) != self.task.spatial_dims:
            self.report.add(
                DataProblem(
                    where,
                    f"image is {len(shape)}D (shape {tuple(values.shape)}) but task.spatial_dims is "
                    f"{self.task.spatial_dims} ({entry})",
                    f"set task.spatial_dims = {len(shape)} with a matching image_size, or use "
                    f"{self.task.spatial_dims}D images",
                )
            )
        bad = int(values.size - np.count_nonzero(np.isfinite(values))) if values.dtype.kind == "f" else 0
        if bad:
            self.report.add(
                DataProblem(
                    where,
                    f"image has {bad} NaN/Inf voxel(s) ({entry})",
                    "re-export the image, or replace non-finite voxels (e.g. numpy.nan_to_num) before training",
                )
            )

    def _check_label_map(
        self, label: MetaTensor, *, image: MetaTensor, path: Path, image_path: Path, entry: str
    ) -> None:
        where = str(path)
        values = spatial_array(label)
        image_shape = spatial_shape_of(image.shape[1:])
        label_shape = spatial_shape_of(values.shape)
        if label.shape[0] != 1:
            self.report.add(
                DataProblem(where, f"label map has {label.shape[0]} channels ({entry})", "store one label map per case")
            )
            return
        if label_shape != image_shape:
            self.report.add(
                DataProblem(
                    where,
                    f"label shape {label_shape} differs from image shape {image_shape} of {image_path.name} ({entry})",
                    "resample the label map onto the image grid (nearest neighbour) or pair it with the right image",
                )
            )
            return
        difference = float(np.max(np.abs(affine_of(label) - affine_of(image))))
        if difference > AFFINE_TOLERANCE_MM:
            self.report.add(
                DataProblem(
                    where,
                    f"label affine differs from the affine of {image_path.name} by up to {difference:.4g} mm ({entry})",
                    "write the label map with the image's affine (copy the header), or pair it with the right image",
                )
            )
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)):
                self.report.add(
                    DataProblem(where, f"label map has NaN/Inf voxels ({entry})", "store integer class indices")
                )
                return
            if not np.all(values == np.round(values)):
                self.report.add(
                    DataProblem(
                        where,
                        f"label map has non-integer values ({entry})",
                        "store integer class indices (it may be a probability map or an image saved as a label)",
                    )
                )
                return
        unique, counts = np.unique(values, return_counts=True)
        found = {int(value): int(count) for value, count in zip(unique, counts)}
        self.report.record_labels(found)
        binarize = self.task is not None and self.task.binarize_labels
        undeclared = sorted(set(found) - self.declared)
        if undeclared:
            self.report.add(
                DataProblem(
                    where,
                    f"label value(s) {_short(undeclared)} are not declared in dataset.json 'labels' "
                    f"({_short(sorted(self.declared))}) ({entry})",
                    "declare every label value in dataset.json 'labels'"
                    + (" (with binarize_labels they all become 1)" if binarize else " or fix the label map"),
                    "warning" if binarize else "error",
                )
            )
        if self.task is not None and not binarize:
            outside = sorted(value for value in found if value < 0 or value >= self.task.num_classes)
            if outside:
                self.report.add(
                    DataProblem(
                        where,
                        f"label value(s) {_short(outside)} are outside [0, {self.task.num_classes}) "
                        f"for task.num_classes = {self.task.num_classes} ({entry})",
                        f"set task.num_classes = {max(found) + 1}, or task.binarize_labels = true for a "
                        "foreground mask",
                    )
                )

    def _check_class(self, value: int, *, entry: str) -> int | None:
        where = str(self.manifest.source)
        problems = []
        if self.declared and value not in self.declared:
            problems.append(f"is not declared in 'labels' ({_short(sorted(self.declared))})")
        if self.task is not None and not 0 <= value < self.task.num_classes:
            problems.append(f"is outside [0, {self.task.num_classes}) for task.num_classes = {self.task.num_classes}")
        if problems:
            self.report.add(
                DataProblem(
                    where,
                    f"{entry} class label {value} " + " and ".join(problems),
                    "use a class index declared in 'labels' and below task.num_classes",
                )
            )
            return None
        self.report.record_labels({value: 1})
        return value


def _short(values: list[int], limit: int = 8) -> str:
    text = ", ".join(str(value) for value in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"
