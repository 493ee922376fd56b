"""[normalization]: settings of the site-level intensity normalizations that task.intensity names."""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel


class NormalizationConfig(StrictModel):
    """Settings of the site-level intensity normalizations named by task.intensity."""

    foreground: Literal["mean", "nonzero", "all"] = Field(
        "mean", description="voxels the statistics use: above the image mean (MRI head/body), non-zero, or all"
    )
    percentiles: tuple[float, float] = Field((1.0, 99.0), description="site_percentile: maps these to 0 and 1")
    window_level: float = Field(40.0, description="ct_window: centre of the window in HU (40: soft tissue)")
    window_width: float = Field(400.0, gt=0, description="ct_window: width in HU")
    landmarks: list[float] = Field(
        default_factory=lambda: [1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0],
        description="nyul: foreground percentiles the sites share and map onto the federation's average",
    )
    histogram_bins: int = Field(48, ge=4, le=256, description="bins of the per-site histograms in the report")

    @model_validator(mode="after")
    def _check(self) -> NormalizationConfig:
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"normalization.percentiles {list(self.percentiles)} must satisfy 0 <= low < high <= 100")
        marks = self.landmarks
        if len(marks) < 3 or any(b <= a for a, b in itertools.pairwise(marks)) or marks[0] < 0 or marks[-1] > 100:
            raise ValueError(
                f"normalization.landmarks {marks} must be at least 3 increasing percentiles within [0, 100], "
                f"e.g. [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]"
            )
        return self
