"""What travels between ServerApp and ClientApp: record keys and the run's UserConfig entries."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, UserConfig

from fedmed.config import RunConfig, run_config_from_dict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

RUN_CONFIG_KEY = "fedmed-config"
RUN_DIR_KEY = "fedmed-run-dir"
RUN_ID_KEY = "fedmed-run-id"


def encode_run(config: RunConfig, *, run_dir: Path, run_id: str) -> UserConfig:
    """The run as Flower UserConfig: the resolved config travels as one JSON string."""
    return {
        RUN_CONFIG_KEY: config.model_dump_json(),
        RUN_DIR_KEY: str(run_dir),
        RUN_ID_KEY: run_id,
    }


def decode_config(run_config: UserConfig) -> RunConfig:
    return _decode(str(run_config[RUN_CONFIG_KEY]))


@lru_cache(maxsize=4)
def _decode(text: str) -> RunConfig:
    # Paths were resolved before encoding; base only matters for relative ones.
    return run_config_from_dict(json.loads(text), base=Path.cwd(), source=RUN_CONFIG_KEY)


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({key: value.detach().cpu().contiguous() for key, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()
