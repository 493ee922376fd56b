"""One case's files: each read once, then checked (readable, finite, modalities on one grid, dimensionality
and channels matching the site's other cases and the task); its labels are checked by label_check."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed.config import TaskConfig

from .grid_check import modality_grid_problems
from .io import (
    EmptyImageError,
    ImageReadError,
    WrongFileTypeError,
    image_format,
    read_image,
    spatial_array,
    stack_modalities,
)
from .label_check import LabelChecker
from .manifest import MANIFEST_NAME, Case, Manifest
from .preprocess import spatial_shape_of
from .problems import DataProblem, errors_in
from .report import ValidationReport

if TYPE_CHECKING:
    from monai.data import MetaTensor

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


class CaseChecker:
    """Checks the cases of one site in turn, adding every problem to `report`."""

    def __init__(self, *, manifest: Manifest, task: TaskConfig | None, report: ValidationReport) -> None:
        self.manifest = manifest
        self.task = task
        self.report = report
        self.dims_seen: Counter[int] = Counter()
        # The first case read sets the site's channel count; every other case must match it.
        self.channels: int | None = None
        self.channels_entry = ""
        # An enhancement task never looks at labels, so it need not read them.
        self.read_labels = task is None or task.kind != "enhancement"
        self.labels = LabelChecker(task=task, declared=set(manifest.labels), source=manifest.source, report=report)

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
            label = self.labels.class_label(case.label, entry=entry)
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
            self.labels.label_map(label, image=first, path=case.label, image_path=case.image, entry=entry)
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
        # Scan geometry fits these modes per channel (fedmed.data.normalization.scan_stats); the fixed grid pools them.
        if channels > 1 and self.task.intensity in SINGLE_CHANNEL_INTENSITY_MODES and not self.task.scan_geometry:
            problems.append(
                DataProblem(
                    str(self.manifest.source),
                    f"task.intensity '{self.task.intensity}' fits one intensity scale per site for single-channel "
                    f"images, but these cases have {channels} channels",
                    "set task.intensity = 'zscore' or 'percentile' (normalized per image and per channel)",
                )
            )
        return problems
