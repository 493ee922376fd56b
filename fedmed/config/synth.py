"""[synth]: a simulated federation of synthetic phantoms, each site with its own scanner drift, and the checks
that the run's [task] and [[sites]] agree with it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .sites import SITE_NAME_PATTERN, check_unique_names
from .task import TaskKind

if TYPE_CHECKING:
    from .run import RunConfig


class SiteDrift(StrictModel):
    """How one synthetic site's scanner and population differ from the reference."""

    name: str = Field(pattern=SITE_NAME_PATTERN)
    intensity_scale: float = Field(1.0, gt=0)
    intensity_offset: float = 0.0
    gamma: float = Field(1.0, gt=0)
    bias_field: float = Field(0.0, ge=0, lt=1, description="amplitude of a smooth multiplicative field")
    noise_std: float = Field(0.0, ge=0, description="Gaussian noise, relative to the image's intensity range")
    blur_sigma: float = Field(0.0, ge=0, description="Gaussian blur in voxels")
    downsample: int = Field(1, ge=1, le=4, description="acquire at 1/N resolution, then resample back")
    label_prevalence: float | None = Field(
        None, gt=0, lt=1, description="segmentation: foreground fraction target; classification: positive rate"
    )
    train_cases: int | None = Field(None, ge=1)
    val_cases: int | None = Field(None, ge=1)
    spacing: list[float] | None = Field(
        None, description="native voxel size in mm of this site's scanner (default: synth.spacing), e.g. [0.8, 0.8, 3]"
    )

    @model_validator(mode="after")
    def _check_spacing(self) -> SiteDrift:
        if self.spacing is not None and (not self.spacing or any(value <= 0 for value in self.spacing)):
            raise ValueError(f"site {self.name}: spacing {self.spacing} must list positive voxel sizes in mm")
        return self


# A site's grid needs a few voxels per axis for a phantom (and a network) to make sense of it.
MIN_SYNTH_VOXELS = 4


class SynthConfig(StrictModel):
    task: TaskKind
    spatial_dims: Literal[2, 3] = 2
    image_size: list[int] = Field(
        default_factory=lambda: [64, 64],
        description="voxels per axis; with spacing (here or at a site): the field of view in voxels of synth.spacing",
    )
    train_cases: int = Field(12, ge=1)
    val_cases: int = Field(6, ge=1)
    seed: int = 0
    sites: list[SiteDrift] = Field(min_length=1)
    modalities: list[str] = Field(
        default_factory=lambda: ["MRI"],
        min_length=1,
        description="co-registered images per case, named after their contrast (FLAIR, T1, T1Gd, T2; MRI: generic)",
    )
    num_classes: int = Field(
        2, ge=2, le=4, description="segmentation: 3 or 4 give lesions nested sub-regions (oedema > core > enhancing)"
    )
    spacing: list[float] | None = Field(
        None, description="reference voxel size in mm (default 1): sites write the same field of view at their spacing"
    )

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(f"image_size has {len(self.image_size)} entries but spatial_dims is {self.spatial_dims}")
        check_unique_names([site.name for site in self.sites], "synth.sites")
        self._check_modalities()
        if self.num_classes > 2 and self.task != "segmentation":
            raise ValueError(
                f"synth.num_classes = {self.num_classes} gives lesions nested label regions, which only segmentation "
                f"uses; {self.task} cases are generated without them: remove synth.num_classes (or set it to 2)"
            )
        self._check_spacing()
        return self

    def _check_modalities(self) -> None:
        if any(not name.strip() for name in self.modalities):
            raise ValueError(f"synth.modalities {self.modalities} has an empty name; name each modality, e.g. 'FLAIR'")
        folded = [name.strip().lower() for name in self.modalities]
        repeated = sorted({name for name, key in zip(self.modalities, folded) if folded.count(key) > 1})
        if repeated:
            raise ValueError(
                f"synth.modalities lists {', '.join(repeated)} more than once; give each modality once, "
                "e.g. ['FLAIR', 'T1']"
            )

    def _check_spacing(self) -> None:
        dims = self.spatial_dims
        example = [1.0] * (dims - 1) + [3.0]
        if self.spacing is not None and (len(self.spacing) != dims or any(value <= 0 for value in self.spacing)):
            raise ValueError(
                f"synth.spacing {self.spacing} must be {dims} positive voxel sizes in mm (one per spatial "
                f"dimension), e.g. {example}"
            )
        for site in self.sites:
            if site.spacing is None:
                continue
            if len(site.spacing) != dims:
                raise ValueError(
                    f"synth.sites {site.name}: spacing {site.spacing} has {len(site.spacing)} entries but "
                    f"spatial_dims is {dims}; give one voxel size per axis, e.g. {example}"
                )
            shape = self.site_shape(site)
            if min(shape) < MIN_SYNTH_VOXELS:
                raise ValueError(
                    f"synth.sites {site.name}: spacing {site.spacing} leaves only {shape} voxels for the "
                    f"{self.field_of_view_mm} mm field of view; use at least {MIN_SYNTH_VOXELS} per axis: lower "
                    "the site's spacing or raise synth.image_size"
                )

    @property
    def physical(self) -> bool:
        """Whether sites write at a voxel spacing of their own (any spacing set), in millimetre coordinates."""
        return self.spacing is not None or any(site.spacing is not None for site in self.sites)

    @property
    def reference_spacing(self) -> list[float]:
        return list(self.spacing) if self.spacing is not None else [1.0] * self.spatial_dims

    @property
    def field_of_view_mm(self) -> list[float]:
        """The imaged region: image_size voxels at the reference spacing, the same at every site."""
        return [size * step for size, step in zip(self.image_size, self.reference_spacing)]

    def site_spacing(self, site: SiteDrift) -> list[float]:
        return list(site.spacing) if site.spacing is not None else self.reference_spacing

    def site_shape(self, site: SiteDrift) -> list[int]:
        """Voxels per axis of a site's volumes: the field of view at the site's own spacing, rounded half up."""
        return [
            max(1, math.floor(extent / step + 0.5))
            for extent, step in zip(self.field_of_view_mm, self.site_spacing(site))
        ]


def check_synth_matches_run(run: RunConfig) -> None:
    """[synth] generates what [task] trains on and the sites [[sites]] names."""
    if run.sites and run.synth is not None and run.site_names != [site.name for site in run.synth.sites]:
        raise ValueError(
            "[[sites]] and [synth] name different sites; give one of them (a resolved config lists the "
            "generated sites under [[sites]] with the same names)"
        )
    if run.synth is None:
        return
    if run.synth.task != run.task.kind:
        raise ValueError(f"synth.task '{run.synth.task}' differs from task.kind '{run.task.kind}'")
    if run.synth.spatial_dims != run.task.spatial_dims:
        raise ValueError(
            f"synth.spatial_dims {run.synth.spatial_dims} differs from task.spatial_dims {run.task.spatial_dims}"
        )
    _check_task_fit(run, run.synth)


def _check_task_fit(run: RunConfig, synth: SynthConfig) -> None:
    task = run.task
    modalities = len(synth.modalities)
    # in_channels unset is resolved from the data; set, it must be what the generated cases hold.
    if task.in_channels is not None and task.in_channels != modalities:
        raise ValueError(
            f"task.in_channels is {task.in_channels} but synth.modalities {synth.modalities} gives {modalities} "
            f"image(s) per case; set task.in_channels = {modalities} or remove it (it is then taken from the data)"
        )
    # binarize_labels folds every label into one class, so the task then has 2 whatever the synth writes.
    expected = 2 if task.binarize_labels else synth.num_classes
    if task.kind == "segmentation" and task.num_classes != expected:
        fix = (
            "task.binarize_labels maps every label > 0 to 1: set task.num_classes = 2"
            if task.binarize_labels
            else f"set task.num_classes = {synth.num_classes}, or synth.num_classes = {task.num_classes}"
        )
        raise ValueError(
            f"task.num_classes is {task.num_classes} but synth.num_classes = {synth.num_classes} writes label "
            f"maps with {synth.num_classes} classes (background included); {fix}"
        )
