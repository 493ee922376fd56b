"""Run configs for the deployment tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmed.deploy.local import LocalFederation


def run_config(federation: LocalFederation, name: str, **sections: dict[str, Any]) -> Path:
    """A small segmentation run on the test sites; `sections` override parts of it."""
    config: dict[str, Any] = {
        "name": name,
        "seed": 3,
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [32, 32]},
        "model": {"channels": [8, 16]},
        "train": {"rounds": 2, "learning_rate": 0.003},
        "strategy": {"round_timeout_s": 60},
        # A few cases per site: planning at σ 2 keeps a DP run few-step and below the mostly-noise line, where the
        # default σ 4 would plan the step cap (the plan check has its own tests).
        "dp_sgd": {"noise_multiplier": 2.0},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    return federation.write_run_config(config)
