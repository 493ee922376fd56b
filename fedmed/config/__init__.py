"""Typed configuration (run, synthetic data, site, server) loaded from TOML and validated at load time.

One module per section of a run config ([task] in task.py, [strategy] in strategy.py, ...), each with the
checks across sections that its feature needs; run.py puts them together. Imports only fedmed.core.
"""

from .compression import CompressionConfig
from .deployment import ServerConfig, SiteConfig, load_server_config, load_site_config
from .engine import EngineConfig
from .evaluation import BaselinesConfig, EvaluationConfig
from .loader import (
    apply_overrides,
    dump_toml,
    load_run_config,
    load_synth_config,
    read_toml,
    run_config_from_dict,
    validate,
)
from .model import ModelConfig
from .normalization import NormalizationConfig
from .pretrain import PretrainConfig, pretraining_unsupported
from .privacy import ClientDpConfig, DpSgdConfig, PrivacyBudget, SecAggConfig, SitePrivacyPolicy
from .robust import RobustConfig
from .run import RunConfig
from .scan_geometry import DataConfig, InferenceConfig
from .sites import SiteEntry
from .strategy import StrategyConfig
from .synth import SiteDrift, SynthConfig
from .task import TaskConfig, TaskKind
from .tracking import TrackingConfig
from .train import AugmentationConfig, TrainConfig

__all__ = [
    "AugmentationConfig",
    "BaselinesConfig",
    "ClientDpConfig",
    "CompressionConfig",
    "DataConfig",
    "DpSgdConfig",
    "EngineConfig",
    "EvaluationConfig",
    "InferenceConfig",
    "ModelConfig",
    "NormalizationConfig",
    "PretrainConfig",
    "PrivacyBudget",
    "RobustConfig",
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
