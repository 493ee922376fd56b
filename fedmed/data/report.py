"""What validating a site found: counts, shapes, intensity range, label counts and every problem."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmed.core.log import logger

from .problems import DataProblem, DataValidationError, errors_in


@dataclass
class ValidationReport:
    path: Path
    kind: str | None = None
    problems: list[DataProblem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    image_shapes: dict[tuple[int, ...], int] = field(default_factory=dict)
    intensity_min: float | None = None
    intensity_max: float | None = None
    label_counts: dict[int, int] = field(default_factory=dict)
    # Channels per case (modalities, or channels of a 4D file); None until a case was read.
    channels: int | None = None

    @property
    def errors(self) -> list[DataProblem]:
        return errors_in(self.problems)

    @property
    def warnings(self) -> list[DataProblem]:
        return [problem for problem in self.problems if problem.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, problem: DataProblem) -> None:
        self.problems.append(problem)

    def record_image(self, shape: tuple[int, ...], values: np.ndarray, *, count: int = 1) -> None:
        self.image_shapes[shape] = self.image_shapes.get(shape, 0) + count
        finite = values[np.isfinite(values)] if not np.all(np.isfinite(values)) else values
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            self.intensity_min = low if self.intensity_min is None else min(self.intensity_min, low)
            self.intensity_max = high if self.intensity_max is None else max(self.intensity_max, high)

    def record_labels(self, counts: dict[int, int]) -> None:
        for value, count in counts.items():
            self.label_counts[value] = self.label_counts.get(value, 0) + count

    def summary(self) -> str:
        """A few lines for a site admin: what is there and what is wrong."""
        counts = ", ".join(f"{split}: {count}" for split, count in self.counts.items()) or "no cases read"
        shapes = ", ".join(
            f"{'x'.join(map(str, shape))} ({count})" for shape, count in sorted(self.image_shapes.items())
        )
        lines = [f"{self.path} ({self.kind or 'unknown kind'}): {counts}"]
        if shapes:
            lines.append(f"  image shapes: {shapes}")
        if self.channels is not None:
            lines.append(f"  channels per case: {self.channels}")
        if self.intensity_min is not None:
            lines.append(f"  intensity range: {self.intensity_min:.4g} .. {self.intensity_max:.4g}")
        if self.label_counts:
            unit = "cases" if self.kind == "classification" else "voxels"
            lines.append(f"  label {unit}: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.label_counts.items())))
        lines.extend(f"  {problem.severity.upper()} {problem}" for problem in self.problems)
        if self.ok:
            lines.append(f"  OK ({len(self.warnings)} warning(s))")
        return "\n".join(lines)


def raise_if_errors(report: ValidationReport, *, context: str) -> None:
    for problem in report.warnings:
        logger.warning("%s", problem)
    if not report.ok:
        raise DataValidationError(report.problems, context=context)
