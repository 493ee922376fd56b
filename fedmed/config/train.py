"""[train] and [train.augmentation]: each site's local training."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel

# Scan geometry, eval_every unset: about this many evaluations per run (the last round's included). Validating
# whole native-size volumes costs 16-92 s per BraTS case against at most 6 s for a round's patch training.
SCAN_EVALUATIONS = 5


class AugmentationConfig(StrictModel):
    """Random training augmentations (MONAI dictionary transforms); each is off at 0."""

    flips: bool = Field(True, description="flip along every spatial axis with probability 1/2")
    rotate_degrees: float = Field(0.0, ge=0, le=180, description="random rotation up to this angle per axis")
    scale: float = Field(0.0, ge=0, lt=1, description="random zoom by a factor in [1 - scale, 1 + scale]")
    intensity_shift: float = Field(0.0, ge=0, description="add an offset up to this (normalized intensity units)")
    intensity_scale: float = Field(0.0, ge=0, lt=1, description="multiply intensities by 1 + a factor up to this")
    gamma: float = Field(0.0, ge=0, lt=1, description="gamma contrast in [1 - gamma, 1 + gamma]")
    probability: float = Field(0.2, gt=0, le=1, description="chance that each spatial or intensity augmentation runs")

    @property
    def beyond_flips(self) -> bool:
        return any((self.rotate_degrees, self.scale, self.intensity_shift, self.intensity_scale, self.gamma))


class TrainConfig(StrictModel):
    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision; used only on CUDA")
    augment: bool = Field(True, description="switches every augmentation in [train.augmentation] on or off")
    augmentation: AugmentationConfig = Field(default_factory=AugmentationConfig)
    eval_every: int | None = Field(
        None,
        ge=1,
        description="evaluate the global model at every site every N rounds, and always in the last round; unset: "
        "every round on a fixed grid, every ceil(rounds / 5) rounds in scan geometry (whole-volume validation costs "
        "many rounds of patch training)",
    )
    patch_size: list[int] | None = Field(
        None, description="scan geometry: train on random patches of this size (voxels after resampling)"
    )
    samples_per_volume: int = Field(1, ge=1, description="scan geometry: patches drawn from each case per epoch")
    sampling: Literal["pos_neg", "classes", "uniform"] = Field(
        "pos_neg", description="segmentation patches: centred on foreground/background, on each class, or anywhere"
    )
    positive_fraction: float = Field(0.5, ge=0, le=1, description="pos_neg: share of patches centred on foreground")
    local_steps: int | None = Field(
        None,
        ge=1,
        description="step budget: every site takes this many optimizer steps per round whatever its size (its data "
        "cycled as needed), so large and small sites pull equally; default: local_epochs passes over its data",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: the local learning rate decays over the rounds, to a tenth in the last"
    )
    keep_optimizer_state: bool = Field(
        False,
        description="each site keeps its optimizer's state (Adam's moments, SGD's momentum) on its disk from round to "
        "round instead of starting it afresh; never sent",
    )

    def evaluation_interval(self, *, scan_geometry: bool) -> int:
        """Rounds between evaluations: eval_every when set, else the default for the task's geometry."""
        if self.eval_every is not None:
            return self.eval_every
        # A fixed rule, not one timed at run time: an evaluation round samples Flower's nodes from the seeded
        # `random` module, so a schedule that followed the clock would make the same config train other models.
        return max(1, math.ceil(self.rounds / SCAN_EVALUATIONS)) if scan_geometry else 1

    def evaluates(self, server_round: int, *, scan_geometry: bool) -> bool:
        """Whether the global model is evaluated at the sites after `server_round` (the last round always is)."""
        return server_round == self.rounds or server_round % self.evaluation_interval(scan_geometry=scan_geometry) == 0

    @model_validator(mode="after")
    def _check_patch(self) -> TrainConfig:
        if self.patch_size is not None and any(size < 8 for size in self.patch_size):
            raise ValueError(f"train.patch_size {self.patch_size} is too small; use at least 8 voxels per axis")
        return self
