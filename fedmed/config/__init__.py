"""Typed configuration (run, synthetic data, site, server) loaded from TOML and validated at load time.

Imports only fedmed.core.
"""

from .deployment import ServerConfig, SiteConfig, load_server_config, load_site_config
from .loader import (
    apply_overrides,
    dump_toml,
    load_run_config,
    load_synth_config,
    read_toml,
    run_config_from_dict,
    validate,
)
from .pretrain import PretrainConfig
from .privacy import ClientDpConfig, DpSgdConfig, PrivacyBudget, SecAggConfig, SitePrivacyPolicy
from .schema import (
    AugmentationConfig,
    BaselinesConfig,
    DataConfig,
    EngineConfig,
    EvaluationConfig,
    InferenceConfig,
    ModelConfig,
    NormalizationConfig,
    RunConfig,
    SiteDrift,
    SiteEntry,
    StrategyConfig,
    SynthConfig,
    TaskConfig,
    TaskKind,
    TrackingConfig,
    TrainConfig,
    pretraining_unsupported,
)

__all__ = [
    "AugmentationConfig",
    "BaselinesConfig",
    "ClientDpConfig",
    "DataConfig",
    "DpSgdConfig",
    "EngineConfig",
    "EvaluationConfig",
    "InferenceConfig",
    "ModelConfig",
    "NormalizationConfig",
    "PretrainConfig",
    "PrivacyBudget",
    "RunConfig",
    "SecAggConfig",
    "ServerConfig",
    "SiteConfig",
    "SiteDrift",
    "SiteEntry",
    "SitePrivacyPolicy",
    "StrategyConfig",
    "SynthConfig",
    "TaskConfig",
    "TaskKind",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_toml",
    "load_run_config",
    "load_server_config",
    "load_site_config",
    "load_synth_config",
    "pretraining_unsupported",
    "read_toml",
    "run_config_from_dict",
    "validate",
]
