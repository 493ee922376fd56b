"""Typed run and synthesis configuration, validated when loaded.

Every section forbids unknown keys so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .privacy import ClientDpConfig, DpSgdConfig, SecAggConfig

TaskKind = Literal["segmentation", "classification", "enhancement"]
# Per image: "zscore", "percentile", "minmax", "none". From the site's own training data (statistics kept
# in the site's state): "site_zscore", "site_percentile"; fixed: "ct_window"; federated: "nyul".
IntensityMode = Literal["zscore", "percentile", "minmax", "none", "site_zscore", "site_percentile", "ct_window", "nyul"]
UNIT_RANGE_INTENSITIES = ("percentile", "minmax", "site_percentile", "ct_window")
SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class TaskConfig(StrictModel):
    kind: TaskKind
    spatial_dims: Literal[2, 3] = 2
    num_classes: int = Field(2, ge=2, description="segmentation: classes incl. background; classification: classes")
    image_size: list[int] = Field(default_factory=lambda: [64, 64], description="every image is resampled to this")
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

    @model_validator(mode="after")
    def _image_size_matches_dims(self) -> TaskConfig:
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


class ModelConfig(StrictModel):
    name: str = Field("default", description="model registry key; 'default' picks the task's default network")
    channels: list[int] | None = None
    strides: list[int] | None = None
    num_res_units: int | None = Field(None, ge=0)
    norm: Literal["instance", "group", "batch"] | None = None
    dropout: float | None = Field(None, ge=0, lt=1)


class TrainConfig(StrictModel):
    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision; used only on CUDA")
    augment: bool = Field(True, description="random flips along every spatial axis during training")
    eval_every: int = Field(1, ge=1, description="evaluate the global model at every site every N rounds")


class StrategyConfig(StrictModel):
    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0, description="FedProx: weight of mu/2 * ||w - w_global||^2")
    fedbn: bool = Field(False, description="keep normalization layers site-local (never sent, never aggregated)")
    server_learning_rate: float = Field(0.01, gt=0, description="FedAdam/FedYogi: server step size (eta)")
    server_beta_1: float = Field(0.9, ge=0, lt=1)
    server_beta_2: float = Field(0.99, ge=0, lt=1)
    server_tau: float = Field(1e-3, gt=0)
    min_sites: int | None = Field(None, ge=1, description="quorum per round; default: every site")
    fraction_train: float = Field(1.0, gt=0, le=1)
    round_timeout_s: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _prox_needs_mu(self) -> StrategyConfig:
        if self.name == "fedprox" and self.proximal_mu == 0.0:
            raise ValueError("strategy 'fedprox' needs proximal_mu > 0 (e.g. 0.01); with 0 it is plain fedavg")
        return self


class EngineConfig(StrictModel):
    name: Literal["inprocess", "ray"] = "inprocess"
    cpus_per_site: float = Field(1.0, gt=0, description="ray: CPUs reserved per simulated site")
    gpus_per_site: float = Field(0.0, ge=0, description="ray: GPU fraction per simulated site")
    num_cpus: int | None = Field(None, ge=1, description="ray: CPUs Ray may use (default: all)")


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


class EvaluationConfig(StrictModel):
    """Cross-site evaluation: the global and every site's personalized model on every site's validation data."""

    cross_site: bool = Field(True, description="evaluate the models across sites at the end of the run")
    cross_site_every: int = Field(0, ge=0, description="also every N rounds (0: only at the end)")
    finetune_epochs: int = Field(
        0, ge=0, description="personalization: epochs of local fine-tuning of global + local layers at the end"
    )


class BaselinesConfig(StrictModel):
    local_only: bool = False
    pooled: bool = False


class SiteEntry(StrictModel):
    name: str = Field(pattern=SITE_NAME_PATTERN)
    path: Path


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


class SynthConfig(StrictModel):
    task: TaskKind
    spatial_dims: Literal[2, 3] = 2
    image_size: list[int] = Field(default_factory=lambda: [64, 64])
    train_cases: int = Field(12, ge=1)
    val_cases: int = Field(6, ge=1)
    seed: int = 0
    sites: list[SiteDrift] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if len(self.image_size) != self.spatial_dims:
            raise ValueError(f"image_size has {len(self.image_size)} entries but spatial_dims is {self.spatial_dims}")
        _check_unique_names([site.name for site in self.sites], "synth.sites")
        return self


class RunConfig(StrictModel):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = 0
    output_dir: Path = Path("runs")
    task: TaskConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sites: list[SiteEntry] = Field(default_factory=list, description="simulation: the sites' data folders")
    synth: SynthConfig | None = Field(None, description="simulation: generate the sites")
    dp_sgd: DpSgdConfig = Field(default_factory=DpSgdConfig)
    client_dp: ClientDpConfig = Field(default_factory=ClientDpConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.sites and self.synth is not None and self.site_names != [site.name for site in self.synth.sites]:
            raise ValueError(
                "[[sites]] and [synth] name different sites; give one of them (a resolved config lists the "
                "generated sites under [[sites]] with the same names)"
            )
        if self.synth is not None:
            if self.synth.task != self.task.kind:
                raise ValueError(f"synth.task '{self.synth.task}' differs from task.kind '{self.task.kind}'")
            if self.synth.spatial_dims != self.task.spatial_dims:
                raise ValueError(
                    f"synth.spatial_dims {self.synth.spatial_dims} differs from task.spatial_dims "
                    f"{self.task.spatial_dims}"
                )
        _check_unique_names(self.site_names, "sites")
        if self.site_names and self.strategy.min_sites is not None and self.strategy.min_sites > len(self.site_names):
            raise ValueError(
                f"strategy.min_sites is {self.strategy.min_sites} but the federation has only "
                f"{len(self.site_names)} site(s); lower min_sites"
            )
        self._check_privacy()
        return self

    def _check_privacy(self) -> None:
        if self.secagg.enabled and self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(
                f"secagg works with strategy 'fedavg' or 'fedprox' (the server sees only the sum of the updates), "
                f"not '{self.strategy.name}'"
            )
        if self.client_dp.enabled and self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(f"client_dp works with strategy 'fedavg' or 'fedprox', not '{self.strategy.name}'")
        if self.dp_sgd.enabled and self.evaluation.finetune_epochs:
            raise ValueError(
                "evaluation.finetune_epochs must be 0 with dp_sgd: a fine-tune after the run would spend privacy "
                "budget beyond the run's plan; personalize with FedBN's local layers (strategy.fedbn) instead"
            )
        if self.secagg.enabled and len(self.site_names) == 1:
            raise ValueError("secagg needs at least 2 sites: with one site the sum is that site's update")

    @property
    def site_names(self) -> list[str]:
        if self.sites:
            return [site.name for site in self.sites]
        return [site.name for site in self.synth.sites] if self.synth else []


def _check_unique_names(names: list[str], where: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{where}: site names must be unique; {', '.join(duplicates)} appear more than once")
