"""The run config: every section of a run, and the checks across sections in the order they are reported.

Each cross-section check lives beside its feature (privacy.py, scan_geometry.py, synth.py, ...); RunConfig
only calls them, in a fixed order, so the first problem a config has is always the one reported.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from .base import StrictModel
from .compression import CompressionConfig, check_compression
from .engine import EngineConfig
from .evaluation import DEFAULT_FINETUNE_EPOCHS, BaselinesConfig, EvaluationConfig, check_baselines
from .model import ModelConfig
from .normalization import NormalizationConfig
from .pretrain import PretrainConfig, check_pretrain
from .privacy import (
    ClientDpConfig,
    DpSgdConfig,
    SecAggConfig,
    check_dp_sgd_patches,
    check_dp_trainable,
    check_privacy,
    check_secagg_sites,
    dp_trainable,
)
from .robust import RobustConfig, check_robust
from .scan_geometry import DataConfig, InferenceConfig, check_scan_geometry
from .sites import SiteEntry, check_unique_names
from .strategy import StrategyConfig, check_quorum
from .synth import SynthConfig, check_synth_matches_run
from .task import TaskConfig
from .tracking import TrackingConfig
from .train import TrainConfig


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
    robust: RobustConfig = Field(default_factory=RobustConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_strategy(cls, data: object) -> object:
        """FedAvgM by default, for its measured gain; FedAvg under client-level DP, whose noise must come after
        any server optimizer's step (fedmed.config.privacy.check_privacy)."""
        if not isinstance(data, dict):
            return data
        strategy = data.get("strategy") or {}
        if not isinstance(strategy, dict) or "name" in strategy:
            return data

        def enabled(section: str) -> bool:
            values = data.get(section)
            return bool(values.get("enabled")) if isinstance(values, dict) else bool(getattr(values, "enabled", False))

        return {**data, "strategy": {**strategy, "name": "fedavg" if enabled("client_dp") else "fedavgm"}}

    @model_validator(mode="before")
    @classmethod
    def _default_finetune(cls, data: object) -> object:
        """Every site is fine-tuned at the end by default, the fine-tune stopped early and delivered only where it
        beats the global model on cases it did not train on: no site is handed a worse model for it, and the global
        model is untouched. Not under DP-SGD (it would spend budget beyond the plan) nor with Ditto (its personal
        model is the site's own already)."""
        if not isinstance(data, dict):
            return data
        evaluation = data.get("evaluation") or {}
        if not isinstance(evaluation, dict) or "finetune_epochs" in evaluation:
            return data
        dp_sgd = data.get("dp_sgd")
        dp = bool(dp_sgd.get("enabled")) if isinstance(dp_sgd, dict) else bool(getattr(dp_sgd, "enabled", False))
        epochs = 0 if dp or evaluation.get("ditto_lambda") else DEFAULT_FINETUNE_EPOCHS
        return {**data, "evaluation": {**evaluation, "finetune_epochs": epochs}}

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        check_synth_matches_run(self)
        check_unique_names(self.site_names, "sites")
        check_quorum(self)
        check_privacy(self)
        check_baselines(self)
        check_secagg_sites(self)
        check_robust(self)
        check_compression(self)
        check_scan_geometry(self)
        check_dp_sgd_patches(self)
        check_dp_trainable(self)
        check_pretrain(self)
        return self

    @property
    def pretrain_seed(self) -> int:
        """The phantoms' and the pretraining's seed: pretrain.seed, else one past the sites' synth seed."""
        if self.pretrain.seed is not None:
            return self.pretrain.seed
        return abs(self.synth.seed if self.synth is not None else self.seed) + 1

    @property
    def sends_held_values(self) -> bool:
        """Whether the coordinator sends the sites the values the shared weights leave out: with model.init,
        model.freeze, [pretrain] or a partial dp_sgd.trainable the starting point is the coordinator's
        (ModelConfig.sends_held_values)."""
        return self.model.sends_held_values or self.pretrain.enabled or self.trainable != "all"

    @property
    def trainable(self) -> str:
        """What trains at the sites: dp_sgd.trainable resolved ('all' without DP-SGD; fedmed.models.trainable)."""
        return dp_trainable(self)

    @property
    def roi_size(self) -> list[int]:
        """The sliding window's size: inference.roi_size, else the training patch."""
        return list(self.inference.roi_size or self.train.patch_size or self.task.image_size)

    @property
    def site_names(self) -> list[str]:
        if self.sites:
            return [site.name for site in self.sites]
        return [site.name for site in self.synth.sites] if self.synth else []
