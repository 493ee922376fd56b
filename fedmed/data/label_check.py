"""A case's labels: a label map must lie on its image's grid and hold declared integer classes; a class label
must be a declared class the task has."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmed.config import TaskConfig

from .grid_check import AFFINE_TOLERANCE_MM, affine_difference
from .io import affine_of, spatial_array
from .preprocess import spatial_shape_of
from .problems import DataProblem
from .report import ValidationReport

if TYPE_CHECKING:
    from monai.data import MetaTensor


class LabelChecker:
    """Checks every label of one site against the labels its manifest declares and the task's classes."""

    def __init__(self, *, task: TaskConfig | None, declared: set[int], source: Path, report: ValidationReport) -> None:
        self.task = task
        self.declared = declared
        self.source = source  # the manifest that declares the labels
        self.report = report

    def label_map(self, label: MetaTensor, *, image: MetaTensor, path: Path, image_path: Path, entry: str) -> None:
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
        difference = affine_difference(affine_of(label), affine_of(image))
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

    def class_label(self, value: int, *, entry: str) -> int | None:
        where = str(self.source)
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
