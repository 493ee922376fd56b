"""Run configs for the deployment tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fedmed.deploy.local import LocalFederation
from fedmed.deploy.proxy import ProxyError, find_nginx


def require_nginx() -> None:
    """For a test's own federation (as conftest's shared one): skip without nginx, fail under FEDMED_REQUIRE_NGINX=1."""
    try:
        find_nginx()
    except ProxyError as missing:
        if os.environ.get("FEDMED_REQUIRE_NGINX") == "1":
            pytest.fail(f"{missing} (FEDMED_REQUIRE_NGINX=1 makes this a failure, not a skip)")
        pytest.skip(f"{missing}; or set FEDMED_REQUIRE_NGINX=1 to fail instead of skipping")


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
