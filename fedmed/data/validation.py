"""Check a site's data before anything trains on it; every problem names the file and the fix.

Each file is read once. The loader reuses the same scan (`iter_site_cases`), so loading a site validates
it without reading any file twice, and validation never writes anything. A case's modalities (an MSD
"image" list, or the channels of a 4D NIfTI) must share one voxel grid and become the channels of one image.

This module checks a site as a whole (its manifest against the task); case_check.py checks each case's
files, label_check.py its labels and grid_check.py that its modalities share one voxel grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedmed.config import TaskConfig

from .case_check import CaseChecker, CheckedCase
from .grid_check import AFFINE_TOLERANCE_MM, modality_grid_problems
from .manifest import SPLITS, Case, Manifest, parse_manifest
from .npz import check_npz_site, is_npz_site, parse_npz_site
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
    checker = CaseChecker(manifest=manifest, task=task, report=report)
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
    checker = CaseChecker(manifest=manifest, task=task.model_copy(update={"in_channels": None}), report=report)
    unlabelled = Case(image=case.image, other_modalities=case.other_modalities)
    checked = checker.check(split="input", index=0, case=unlabelled, entry=entry)
    return (None if checked is None else checked.image), report.problems
