"""Typed run and synthesis configuration, validated when loaded.

Every section forbids unknown keys so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel
from .pretrain import PretrainConfig
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
    image_size: list[int] = Field(
        default_factory=lambda: [64, 64], description="grid geometry: every image is resampled to this"
    )
    in_channels: int | None = Field(
        None, ge=1, description="modalities per case; unset: taken from the sites' data (simulation) or 1"
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
            if self.intensity in ("site_zscore", "site_percentile", "nyul"):
                raise ValueError(
                    f"task.intensity '{self.intensity}' needs every image in memory and is not available with "
                    "task.spacing; use 'zscore' (MRI, per channel), 'percentile' or 'ct_window' (CT)"
                )
        if self.class_names is not None and len(self.class_names) != self.num_classes - 1:
            raise ValueError(
                f"task.class_names has {len(self.class_names)} names but task.num_classes = {self.num_classes} "
                f"means {self.num_classes - 1} classes after background"
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


class ModelConfig(StrictModel):
    name: str = Field("default", description="model registry key; 'default' picks the task's default network")
    channels: list[int] | None = None
    strides: list[int] | None = None
    num_res_units: int | None = Field(None, ge=0)
    norm: Literal["instance", "group", "batch"] | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    init: Path | None = Field(
        None,
        description="start from these weights (the global model at round 0): a run directory, its "
        "checkpoints/final.pt, a torch state dict file or a MONAI bundle folder (models/model.pt); never downloaded",
    )
    init_exclude: list[str] = Field(
        default_factory=list,
        description="module prefixes (e.g. 'class_layers') that keep their random init instead of model.init's "
        "weights: a new head for another task; every other key must match model.init exactly",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="module prefixes (e.g. 'features.conv0') whose parameters are not trained and not sent: "
        "every site and the coordinator keep their starting values",
    )

    @model_validator(mode="after")
    def _check_prefixes(self) -> ModelConfig:
        for field, prefixes in (("init_exclude", self.init_exclude), ("freeze", self.freeze)):
            if any(not prefix.strip(" .") for prefix in prefixes):
                raise ValueError(f"model.{field} {prefixes} has an empty prefix; name modules, e.g. ['features.conv0']")
        if self.init_exclude and self.init is None:
            raise ValueError("model.init_exclude needs model.init (the weights it excludes keys from); set model.init")
        return self

    @property
    def sends_held_values(self) -> bool:
        """Whether the coordinator sends the sites the values the shared weights leave out (frozen parameters;
        with model.init, the site-local layers' starting values): a site cannot read model.init, a path on the
        coordinator's disk, and must freeze exactly the coordinator's values."""
        return self.init is not None or bool(self.freeze)

    @property
    def total_stride(self) -> int:
        """How much a UNet-style network downsamples (inputs must be divisible by it); 1 for other networks."""
        if self.name not in ("default", "unet", "residual-unet"):
            return 1
        strides = self.strides or [2] * (len(self.channels or [16, 32, 64]) - 1)
        return math.prod(strides)


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
    eval_every: int = Field(1, ge=1, description="evaluate the global model at every site every N rounds")
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

    @model_validator(mode="after")
    def _check_patch(self) -> TrainConfig:
        if self.patch_size is not None and any(size < 8 for size in self.patch_size):
            raise ValueError(f"train.patch_size {self.patch_size} is too small; use at least 8 voxels per axis")
        return self


class StrategyConfig(StrictModel):
    # Unset in a run config: fedavgm, or fedavg under client-level DP (RunConfig._default_strategy).
    name: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"] = "fedavgm"
    proximal_mu: float = Field(0.0, ge=0, description="FedProx: weight of mu/2 * ||w - w_global||^2")
    fedbn: bool = Field(False, description="keep normalization layers site-local (never sent, never aggregated)")
    server_learning_rate: float | None = Field(
        None,
        gt=0,
        description="FedAvgM, FedAdam/FedYogi: server step size; default per strategy: 1.0 for fedavgm, 0.03 (eta) "
        "for fedadam/fedyogi; unused by fedavg/fedprox",
    )
    server_momentum: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="FedAvgM: momentum of the server's step (0: FedAvg with a server learning rate); 0.5 closed most "
        "of the gap to pooled training on the synthetic and IXI federations, 0.9 overshot (README)",
    )
    normalized_averaging: bool = Field(
        False,
        description="FedNova-style: average each site's update divided by its local step count, rescaled by the "
        "sites' weighted mean step count, so sites that take more steps do not pull the model further",
    )
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

    @property
    def server_step_size(self) -> float:
        """server_learning_rate, or the strategy's default: FedAvgM steps the full average, FedOpt a small eta."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        # FedAdam's eta 0.03 beat 0.01 (by about 0.07 Dice) and 0.1 on the synthetic and IXI federations (README).
        return 1.0 if self.name == "fedavgm" else 0.03


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
        0,
        ge=0,
        description="personalization: at most this many epochs of local fine-tuning of global + local layers at the "
        "end, stopped early on the site's tuning split",
    )
    ditto_lambda: float = Field(
        0.0,
        ge=0,
        description="personalization (Ditto): each site also trains a personal model every round, pulled towards the "
        "global one with this weight (lambda/2 ||v - w||^2); it never leaves the site. 0: off",
    )
    tuning_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="fine-tuning or Ditto: share of each site's training cases held out of training to stop the "
        "fine-tune and choose the delivered model (global or personalized); never the validation cases",
    )
    local_baseline: bool = Field(
        False,
        description="every site also trains a local-only model on its own compute, from the first global model it "
        "received, with the run's local steps (if its policy allows), so it sees federated, personalized and "
        "local-only side by side on its own data; it reports only the metrics its policy shares",
    )

    @property
    def personal_training(self) -> bool:
        """Whether sites train a model of their own (fine-tune or Ditto) and so hold out a tuning split."""
        return self.finetune_epochs > 0 or self.ditto_lambda > 0


class DataConfig(StrictModel):
    """How a site holds its preprocessed cases (scan geometry): memory stays bounded whatever their number."""

    cache: Literal["disk", "memory", "none"] = Field(
        "disk",
        description="disk: every preprocessed case in the site's state folder (RAM does not grow with cases); "
        "memory: up to max_cached_cases in RAM; none: preprocess on every read",
    )
    max_cached_cases: int = Field(16, ge=0, description="memory cache: at most this many preprocessed cases in RAM")
    workers: int = Field(0, ge=0, description="DataLoader worker processes for training patches")


class InferenceConfig(StrictModel):
    """Sliding-window inference on whole volumes (scan geometry): validation and prediction."""

    roi_size: list[int] | None = Field(None, description="window size in voxels; default: train.patch_size")
    overlap: float = Field(0.5, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(2, ge=1)


class BaselinesConfig(StrictModel):
    local_only: bool = False
    pooled: bool = False


class TrackingConfig(StrictModel):
    """Where the per-round metrics go besides metrics.jsonl: TensorBoard event files in the run directory's
    tensorboard/ always; an MLflow file store in its mlruns/ when asked (the mlflow extra; no server)."""

    mlflow: bool = Field(False, description="also log to an MLflow store in the run directory (fedmed[mlflow])")


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
        _check_unique_names([site.name for site in self.sites], "synth.sites")
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
    data: DataConfig = Field(default_factory=DataConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    sites: list[SiteEntry] = Field(default_factory=list, description="simulation: the sites' data folders")
    synth: SynthConfig | None = Field(None, description="simulation: generate the sites")
    dp_sgd: DpSgdConfig = Field(default_factory=DpSgdConfig)
    client_dp: ClientDpConfig = Field(default_factory=ClientDpConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_strategy(cls, data: object) -> object:
        """FedAvgM by default, for its measured gain; FedAvg under client-level DP, whose noise must come after
        any server optimizer's step (RunConfig._check_privacy)."""
        if not isinstance(data, dict):
            return data
        strategy = data.get("strategy") or {}
        if not isinstance(strategy, dict) or "name" in strategy:
            return data

        def enabled(section: str) -> bool:
            values = data.get(section)
            return bool(values.get("enabled")) if isinstance(values, dict) else bool(getattr(values, "enabled", False))

        return {**data, "strategy": {**strategy, "name": "fedavg" if enabled("client_dp") else "fedavgm"}}

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
            self._check_synth_matches_task(self.synth)
        _check_unique_names(self.site_names, "sites")
        if self.site_names and self.strategy.min_sites is not None and self.strategy.min_sites > len(self.site_names):
            raise ValueError(
                f"strategy.min_sites is {self.strategy.min_sites} but the federation has only "
                f"{len(self.site_names)} site(s); lower min_sites"
            )
        self._check_privacy()
        self._check_scan_geometry()
        self._check_pretrain()
        return self

    def _check_pretrain(self) -> None:
        if not self.pretrain.enabled:
            return
        if self.model.init is not None:
            raise ValueError(
                "pretrain.enabled = true and model.init both set the run's starting weights; keep one: remove "
                "model.init to start from synthetic pretraining, or set pretrain.enabled = false to start from "
                f"model.init ({self.model.init})"
            )
        if self.synth is not None and self.pretrain.seed == self.synth.seed:
            raise ValueError(
                f"pretrain.seed {self.pretrain.seed} is synth.seed: the phantoms would repeat the simulated sites' own "
                "cases, validation included; choose another pretrain.seed or remove it (default: synth.seed + 1)"
            )
        if problem := pretraining_unsupported(self.task):
            raise ValueError(f"pretrain.enabled: {problem}")

    @property
    def pretrain_seed(self) -> int:
        """The phantoms' and the pretraining's seed: pretrain.seed, else one past the sites' synth seed."""
        if self.pretrain.seed is not None:
            return self.pretrain.seed
        return abs(self.synth.seed if self.synth is not None else self.seed) + 1

    @property
    def sends_held_values(self) -> bool:
        """Whether the coordinator sends the sites the values the shared weights leave out: with model.init,
        model.freeze or [pretrain] the starting point is the coordinator's (ModelConfig.sends_held_values)."""
        return self.model.sends_held_values or self.pretrain.enabled

    def _check_synth_matches_task(self, synth: SynthConfig) -> None:
        task = self.task
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

    def _check_scan_geometry(self) -> None:
        task, train = self.task, self.train
        if not task.scan_geometry:
            if train.patch_size is not None:
                raise ValueError(
                    "train.patch_size needs task.spacing (scan geometry); set task.spacing, e.g. [1, 1, 1]"
                )
            return
        if train.patch_size is None:
            raise ValueError(
                "task.spacing trains on patches: set train.patch_size (voxels after resampling), e.g. [64, 64, 64]"
            )
        if len(train.patch_size) != 3:
            raise ValueError(f"train.patch_size {train.patch_size} needs 3 entries for 3D volumes")
        roi = self.inference.roi_size
        if roi is not None and len(roi) != 3:
            raise ValueError(f"inference.roi_size {roi} needs 3 entries for 3D volumes")
        superres = task.kind == "enhancement" and task.enhancement == "superres"
        if superres and any(size % task.superres_factor for size in train.patch_size):
            raise ValueError(
                f"train.patch_size {train.patch_size} must be divisible by superres_factor {task.superres_factor}"
            )
        divisor = self.model.total_stride
        if divisor > 1 and any(size % divisor for size in [*train.patch_size, *(roi or [])]):
            raise ValueError(
                f"train.patch_size {train.patch_size} (and inference.roi_size) must be divisible by the UNet's total "
                f"stride {divisor}; change the patch size or model.strides"
            )
        if self.dp_sgd.enabled and train.samples_per_volume > 1:
            raise ValueError(
                "dp_sgd protects each case: with train.samples_per_volume > 1 one patient would count several "
                "times per step; set train.samples_per_volume = 1"
            )

    @property
    def roi_size(self) -> list[int]:
        """The sliding window's size: inference.roi_size, else the training patch."""
        return list(self.inference.roi_size or self.train.patch_size or self.task.image_size)

    def _check_privacy(self) -> None:
        if self.client_dp.enabled and self.strategy.name not in ("fedavg", "fedprox"):
            raise ValueError(
                f"client_dp works with strategy 'fedavg' or 'fedprox', not '{self.strategy.name}': Flower noises the "
                "strategy's output, so a server optimizer's state (FedAvgM's momentum, FedAdam's moments) would keep "
                "the sites' un-noised updates and release them again in later rounds, outside the privacy accounting; "
                "set strategy.name = 'fedavg'"
            )
        if self.strategy.normalized_averaging and self.secagg.enabled:
            raise ValueError(
                "strategy.normalized_averaging needs each site's update, but with secagg.enabled the coordinator "
                "sees only their masked sum; turn one off, or equalize the sites' pull with train.local_steps (the "
                "same step budget at every site) instead"
            )
        if self.strategy.normalized_averaging and self.client_dp.enabled:
            raise ValueError(
                "strategy.normalized_averaging rescales each site's update by its step count, which can stretch a "
                "clipped update past client_dp.clipping_norm, so the noise would no longer cover one site; turn one "
                "off, or equalize the sites' pull with train.local_steps (the same step budget at every site) instead"
            )
        if self.dp_sgd.enabled and self.evaluation.finetune_epochs:
            raise ValueError(
                "evaluation.finetune_epochs must be 0 with dp_sgd: a fine-tune after the run would spend privacy "
                "budget beyond the run's plan; personalize with FedBN's local layers (strategy.fedbn) instead"
            )
        if self.dp_sgd.enabled and self.evaluation.ditto_lambda:
            raise ValueError(
                "evaluation.ditto_lambda must be 0 with dp_sgd: Ditto's personal model trains on the site's data "
                "without DP-SGD and its scores leave the site; personalize with FedBN's local layers (strategy.fedbn)"
            )
        if self.dp_sgd.enabled and self.train.local_steps:
            raise ValueError(
                "train.local_steps must be unset with dp_sgd: DP-SGD plans each round's steps from the privacy "
                "budget; bound them with dp_sgd.max_epochs_per_round instead"
            )
        if self.evaluation.local_baseline and self.baselines.local_only:
            raise ValueError(
                "evaluation.local_baseline and baselines.local_only both train local-only models; keep one: "
                "evaluation.local_baseline at each site on its own compute (deployment), baselines.local_only in the "
                "simulation's process"
            )
        if self.secagg.enabled and len(self.site_names) == 1:
            raise ValueError("secagg needs at least 2 sites: with one site the sum is that site's update")

    @property
    def site_names(self) -> list[str]:
        if self.sites:
            return [site.name for site in self.sites]
        return [site.name for site in self.synth.sites] if self.synth else []


# Label classes the phantoms can draw: segmentation lesions nest up to 4 classes; classification is lesion or not.
MAX_PHANTOM_SEGMENTATION_CLASSES = 4


def pretraining_unsupported(task: TaskConfig) -> str | None:
    """Why synthetic phantoms cannot pre-train this task's network, or None when they can."""
    if task.kind == "classification" and task.num_classes != 2:
        return (
            f"the phantoms are binary (lesion or not) but task.num_classes = {task.num_classes}; pre-train a 2-class "
            "copy of this config with `fedmed pretrain` and start from it with model.init and "
            "model.init_exclude = ['class_layers'] (a new head)"
        )
    if task.kind == "segmentation" and not task.binarize_labels and task.num_classes > MAX_PHANTOM_SEGMENTATION_CLASSES:
        return (
            f"the phantoms draw at most {MAX_PHANTOM_SEGMENTATION_CLASSES} label classes (background, oedema, core, "
            f"enhancing) but task.num_classes = {task.num_classes}; set pretrain.enabled = false"
        )
    return None


def _check_unique_names(names: list[str], where: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{where}: site names must be unique; {', '.join(duplicates)} appear more than once")
