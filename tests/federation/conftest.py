"""Tiny federations for end-to-end tests: real synthetic NIfTI sites, a few rounds, seconds each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedmed.config import RunConfig, run_config_from_dict

SITES = [
    {"name": "site-a"},
    {"name": "site-b", "intensity_scale": 2.0, "intensity_offset": 10.0, "noise_std": 0.03},
    {"name": "site-c", "gamma": 1.3, "downsample": 2},
]

TinyConfig = Callable[..., RunConfig]


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


@pytest.fixture
def tiny_config(tmp_path: Path) -> TinyConfig:
    """tiny_config(kind="segmentation", dims=2, **section_overrides) -> RunConfig writing under tmp_path."""

    def make(kind: str = "segmentation", dims: int = 2, **changes: Any) -> RunConfig:
        size = [32] * dims if dims == 2 else [16] * dims
        raw: dict[str, Any] = {
            "name": f"tiny-{kind}",
            "seed": 3,
            "output_dir": str(tmp_path / "runs"),
            "task": {"kind": kind, "spatial_dims": dims, "image_size": size},
            "model": {"channels": [8, 16]},
            "train": {"rounds": 2, "local_epochs": 1, "batch_size": 4, "learning_rate": 0.003},
            # 4 cases per site: the default σ 4 would plan the step cap, calibrated just past the mostly-noise line;
            # planning at σ 2 keeps DP runs few-step and healthy (the plan check has its own tests).
            "dp_sgd": {"noise_multiplier": 2.0},
            "synth": {
                "task": kind,
                "spatial_dims": dims,
                "image_size": size,
                "train_cases": 4,
                "val_cases": 3,
                "seed": 1,
                "sites": SITES,
            },
        }
        return run_config_from_dict(_merge(raw, changes), base=tmp_path)

    return make
