"""Check a site's data before anything trains on it; every problem names the file and the fix.

Each file is read once. The loader reuses the same scan (`iter_site_cases`), so loading a site validates
it without reading any file twice, and validation never writes anything. A case's modalities (an MSD
"image" list, or the channels of a 4D NIfTI) must share one voxel grid and become the channels of one image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed.config.schema import TaskConfig

from .io import (
    EmptyImageError,
    ImageReadError,
    WrongFileTypeError,
    affine_of,
    image_format,
    read_image,
    spatial_array,
    stack_modalities,
)
from .manifest import MANIFEST_NAME, SPLITS, Case, Manifest, parse_manifest
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
    "check_case_images",
    "check_npz_site",
    "check_site",
    "iter_site_cases",
    "modality_grid_problems",
    "raise_if_errors",
    "validate_site",
]

AFFINE_TOLERANCE_MM = 1e-3
# One statistic (or one landmark set) per site: these modes have no notion of channels.
SINGLE_CHANNEL_INTENSITY_MODES = ("site_zscore", "site_percentile", "nyul")


@dataclass
class CheckedCase:
    """A case whose files were read and passed every check; `image` holds every modality as a channel."""

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
            report.channels = 1  # an .npz site stacks single-channel images (its check refuses anything else)
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


def check_case_images(case: Case, *, task: TaskConfig, entry: str) -> tuple[MetaTensor | None, list[DataProblem]]:
    """Read and check one unlabelled case's images the way `fedmed site check` does (unreadable or corrupt
    files, NaNs, modalities on different grids, wrong dimensionality): its image, or None and the problems."""
    manifest = Manifest(name="", labels={}, modality={}, training=[], validation=[], source=Path(entry))
    report = ValidationReport(path=Path(entry))
    # The channel count is the caller's to judge: the model's, not the first case's.
    checker = _CaseChecker(manifest=manifest, task=task.model_copy(update={"in_channels": None}), report=report)
    unlabelled = Case(image=case.image, other_modalities=case.other_modalities)
    checked = checker.check(split="input", index=0, case=unlabelled, entry=entry)
    return (None if checked is None else checked.image), report.problems


class _CaseChecker:
    def __init__(self, *, manifest: Manifest, task: TaskConfig | None, report: ValidationReport) -> None:
        self.manifest = manifest
        self.task = task
        self.report = report
        self.declared = set(manifest.labels)
        self.dims_seen: Counter[int] = Counter()
        # The first case read sets the site's channel count; every other case must match it.
        self.channels: int | None = None
        self.channels_entry = ""
        # An enhancement task never looks at labels, so it need not read them.
        self.read_labels = task is None or task.kind != "enhancement"

    def check(self, *, split: str, index: int, case: Case, entry: str | None = None) -> CheckedCase | None:
        entry = entry or f"dataset.json {split}[{index}]"
        before = len(errors_in(self.report.problems))
        paths = case.images
        parts = [
            self._read(path, role="image", entry=entry if len(paths) == 1 else f"{entry}, modality {position}")
            for position, path in enumerate(paths)
        ]
        label: Any = None
        if self.read_labels and isinstance(case.label, Path):
            label = self._read(case.label, role="label", entry=entry)
        elif self.read_labels and isinstance(case.label, int):
            label = self._check_class(case.label, entry=entry)
        image: MetaTensor | None = None
        if all(part is not None for part in parts):
            read = [part for part in parts if part is not None]
            for part, path in zip(read, paths):
                self._check_finite(part, path=path, entry=entry)
            grid = modality_grid_problems(read, paths=paths, entry=entry)
            self.report.problems.extend(grid)
            if not grid:
                image = stack_modalities(read)
        if image is not None:
            self._check_image(image, path=case.image, entry=entry)
        first = parts[0]
        # Label maps are drawn on the first modality; the others were just checked against it.
        if first is not None and label is not None and isinstance(case.label, Path):
            self._check_label_map(label, image=first, path=case.label, image_path=case.image, entry=entry)
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
        except EmptyImageError as error:
            listed = self.manifest.source.name == MANIFEST_NAME  # fedmed predict checks files no manifest lists
            fix = "re-export it (an axis of length 0 is left by a failed conversion or crop)"
            self.report.add(
                DataProblem(
                    str(path),
                    f"{role} file holds no voxels ({error}) ({entry})",
                    fix + (f", or remove the case from {MANIFEST_NAME}" if listed else ""),
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
        shape = spatial_shape_of(image.shape[1:])
        self.dims_seen[len(shape)] += 1
        self.report.record_image(shape, spatial_array(image))
        if self.task is not None and len(shape) != self.task.spatial_dims:
            self.report.add(
                DataProblem(
                    where,
                    f"image is {len(shape)}D (shape {tuple(image.shape[1:])}) but task.spatial_dims is "
                    f"{self.task.spatial_dims} ({entry})",
                    f"set task.spatial_dims = {len(shape)} with a matching image_size, or use "
                    f"{self.task.spatial_dims}D images",
                )
            )
        self._check_channels(int(image.shape[0]), path=path, entry=entry)

    def _check_finite(self, image: MetaTensor, *, path: Path, entry: str) -> None:
        """Every channel of one file: the problem names the file that holds the bad voxels."""
        values = image.detach().cpu().numpy()
        bad = int(values.size - np.count_nonzero(np.isfinite(values))) if values.dtype.kind == "f" else 0
        if bad:
            self.report.add(
                DataProblem(
                    str(path),
                    f"image has {bad} NaN/Inf voxel(s) ({entry})",
                    "re-export the image, or replace non-finite voxels (e.g. numpy.nan_to_num) before training",
                )
            )

    def _check_channels(self, channels: int, *, path: Path, entry: str) -> None:
        if self.channels is None:
            self.channels, self.channels_entry = channels, entry
            self.report.channels = channels
            self.report.problems.extend(self._channel_fit(channels, path=path, entry=entry))
        elif channels != self.channels:
            self.report.add(
                DataProblem(
                    str(path),
                    f"image has {channels} channel(s) but {self.channels_entry} has {self.channels} ({entry})",
                    "give every case the same modalities in the same order (as many channels each), or remove "
                    f"this case from {self.manifest.source.name}",
                )
            )

    def _channel_fit(self, channels: int, *, path: Path, entry: str) -> list[DataProblem]:
        """The site's channel count against the manifest's modality names and the task; checked once."""
        problems: list[DataProblem] = []
        declared = self.manifest.modality
        if declared and len(declared) != channels:
            names = ", ".join(declared[key] for key in sorted(declared))
            example = ", ".join(f'"{i}": "{declared.get(i, f"modality{i}")}"' for i in range(channels))
            problems.append(
                DataProblem(
                    str(self.manifest.source),
                    f"'modality' names {len(declared)} channel(s) ({names}) but the images have {channels} "
                    f"(first case read: {entry})",
                    f'name one modality per image channel in {self.manifest.source.name}, e.g. "modality": '
                    f"{{{example}}}, or list the missing modality files",
                )
            )
        if self.task is None:
            return problems
        if self.task.in_channels is not None and self.task.in_channels != channels:
            problems.append(
                DataProblem(
                    str(path),
                    f"image has {channels} channel(s) but task.in_channels is {self.task.in_channels} ({entry})",
                    f"set task.in_channels = {channels}, or give every case {self.task.in_channels} channel(s)",
                )
            )
        if channels > 1 and self.task.intensity in SINGLE_CHANNEL_INTENSITY_MODES:
            problems.append(
                DataProblem(
                    str(self.manifest.source),
                    f"task.intensity '{self.task.intensity}' fits one intensity scale per site for single-channel "
                    f"images, but these cases have {channels} channels",
                    "set task.intensity = 'zscore' or 'percentile' (normalized per image and per channel)",
                )
            )
        return problems

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
        difference = _affine_difference(affine_of(label), affine_of(image))
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


def modality_grid_problems(images: Sequence[MetaTensor], *, paths: Sequence[Path], entry: str) -> list[DataProblem]:
    """Every further modality of a case must lie on the first one's voxel grid: same shape and affine.

    A network sees the modalities as channels of one voxel, so a shifted or resampled modality would
    silently pair each voxel with another place in the body.
    """
    problems: list[DataProblem] = []
    first, first_path = images[0], Path(paths[0])
    shape = spatial_shape_of(first.shape[1:])
    for position, (image, path) in enumerate(zip(images[1:], paths[1:]), start=1):
        other = spatial_shape_of(image.shape[1:])
        where = f"{entry}, modality {position}"
        if other != shape:
            problems.append(
                DataProblem(
                    str(path),
                    f"modality shape {other} differs from shape {shape} of {first_path.name} ({where})",
                    f"resample every modality onto the grid of {first_path.name} (co-register them), or list the "
                    "right files in the case's 'image' list",
                )
            )
            continue
        difference = _affine_difference(affine_of(image), affine_of(first))
        if difference > AFFINE_TOLERANCE_MM:
            problems.append(
                DataProblem(
                    str(path),
                    f"modality affine differs from the affine of {first_path.name} by up to {difference:.4g} mm "
                    f"({where})",
                    f"co-register the modalities and write each with the affine of {first_path.name} (copy the "
                    "header), or list the right files in the case's 'image' list",
                )
            )
    return problems


def _affine_difference(left: np.ndarray, right: np.ndarray) -> float:
    # A 2D PNG and a NIfTI carry affines of different sizes: they cannot share a grid.
    if left.shape != right.shape:
        return float("inf")
    return float(np.max(np.abs(left - right)))


def _short(values: list[int], limit: int = 8) -> str:
    text = ", ".join(str(value) for value in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"
