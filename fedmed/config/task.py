"""[task]: what is learned (segmentation, classification, enhancement) and the geometry every image is given."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel

# A Literal, not an open name: the validators here, in [synth] and in the run's cross-section checks branch on it.
TaskKind = Literal["segmentation", "classification", "enhancement"]
# Per image: "zscore", "percentile", "minmax", "none". From the site's own training data (statistics kept
# in the site's state): "site_zscore", "site_percentile"; fixed: "ct_window"; federated: "nyul".
IntensityMode = Literal["zscore", "percentile", "minmax", "none", "site_zscore", "site_percentile", "ct_window", "nyul"]
UNIT_RANGE_INTENSITIES = ("percentile", "minmax", "site_percentile", "ct_window")


class TaskConfig(StrictModel):
    kind: TaskKind
    spatial_dims: Literal[2, 3] = 2
    num_classes: int = Field(2, ge=2, description="segmentation: classes incl. background; classification: classes")
    image_size: list[int] = Field(
        default_factory=lambda: [64, 64], description="grid geometry: every image is resampled to this"
    )
    in_channels: int | None = Field(
        None, ge=1, description="modalities per case; unset: taken from the sites' data (simulation) or 1"
    )
    channel_names: list[str] | None = Field(
        None,
        description="the modality of each input channel in order (e.g. FLAIR, T1c), as the sites' dataset.json "
        "'modality' names them; unset: taken from the sites' data (simulation). Predictions match files to "
        "channels by it",
    )
    class_names: list[str] | None = Field(
        None, description="segmentation: names of the classes after background, for per-class metrics"
    )
    spacing: list[float] | None = Field(
        None, description="scan geometry: resample every volume to this voxel spacing in mm (instead of image_size)"
    )
    orientation: str = Field("RAS", description="scan geometry: axis codes every volume is reoriented to")
    crop_foreground: bool = Field(False, description="scan geometry: crop each volume to its non-zero bounding box")
    regions: dict[str, list[int]] = Field(
        default_factory=dict,
        description="segmentation: evaluated regions, each the union of label values (e.g. whole_tumour = [1, 2, 3])",
    )
    intensity: IntensityMode = "zscore"
    binarize_labels: bool = Field(False, description="segmentation: map every label > 0 to 1 (e.g. a brain mask)")
    enhancement: Literal["denoise", "superres"] = "denoise"
    noise_std: float = Field(0.2, gt=0, description="denoise: std of the Gaussian noise added at the site")
    superres_factor: int = Field(2, ge=2, le=4)

    @model_validator(mode="before")
    @classmethod
    def _default_intensity(cls, data: object) -> object:
        # Enhancement metrics (PSNR/SSIM) need intensities on a fixed [0, 1] range.
        if isinstance(data, dict) and "intensity" not in data:
            data = {**data, "intensity": "percentile" if data.get("kind") == "enhancement" else "zscore"}
        return data

    @property
    def scan_geometry(self) -> bool:
        """Volumes at native size resampled to `spacing`, trained on patches and validated by sliding window."""
        return self.spacing is not None

    @property
    def channels(self) -> int:
        return self.in_channels or 1

    def class_name(self, value: int) -> str:
        if self.class_names and 1 <= value <= len(self.class_names):
            return self.class_names[value - 1]
        return f"class{value}"

    @model_validator(mode="after")
    def _check_scan_geometry(self) -> TaskConfig:
        if sorted(axis for code in self.orientation for axis in ("LR", "AP", "SI") if code in axis) != [
            "AP",
            "LR",
            "SI",
        ]:
            raise ValueError(f"task.orientation '{self.orientation}' must name each axis once, e.g. 'RAS' or 'LPS'")
        if self.spacing is not None:
            if self.spatial_dims != 3 or self.kind == "classification":
                raise ValueError(
                    "task.spacing (scan geometry) is for 3D segmentation and enhancement; 2D images and "
                    "classification use task.image_size"
                )
            if len(self.spacing) != 3 or any(value <= 0 for value in self.spacing):
                raise ValueError(f"task.spacing {self.spacing} must be 3 positive voxel sizes in mm, e.g. [1, 1, 1]")
        if self.class_names is not None and len(self.class_names) != self.num_classes - 1:
            raise ValueError(
                f"task.class_names has {len(self.class_names)} names but task.num_classes = {self.num_classes} "
                f"means {self.num_classes - 1} classes after background"
            )
        if (
            self.channel_names is not None
            and self.in_channels is not None
            and len(self.channel_names) != self.in_channels
        ):
            raise ValueError(
                f"task.channel_names names {len(self.channel_names)} channel(s) but task.in_channels = "
                f"{self.in_channels}; name one modality per input channel, in order"
            )
        for region, values in self.regions.items():
            bad = [value for value in values if not 1 <= value < self.num_classes]
            if not values or bad:
                raise ValueError(
                    f"task.regions.{region} = {values}: list label values between 1 and {self.num_classes - 1}"
                )
        return self

    @model_validator(mode="after")
    def _image_size_matches_dims(self) -> TaskConfig:
        if self.scan_geometry:
            return self  # no fixed grid: volumes keep their size at task.spacing
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(
                f"image_size has {len(self.image_size)} entries but spatial_dims is {self.spatial_dims}; "
                f"give one size per spatial dimension, e.g. image_size = {[32] * self.spatial_dims}"
            )
        if any(size < 8 for size in self.image_size):
            raise ValueError(f"image_size {self.image_size} is too small; use at least 8 per dimension")
        if self.kind == "enhancement" and self.intensity not in UNIT_RANGE_INTENSITIES:
            raise ValueError(
                f"enhancement needs intensities in [0, 1] for PSNR/SSIM; set intensity to one of "
                f"{', '.join(UNIT_RANGE_INTENSITIES)} (got '{self.intensity}')"
            )
        superres = self.kind == "enhancement" and self.enhancement == "superres"
        if superres and any(size % self.superres_factor for size in self.image_size):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by superres_factor {self.superres_factor}"
            )
        return self
