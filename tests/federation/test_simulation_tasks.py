"""Every task runs end to end through the same ServerApp and ClientApp."""

from __future__ import annotations

import math

import pytest

from fedmed.workflows.simulate import simulate


@pytest.mark.parametrize(
    ("kind", "dims", "task_extra", "metrics"),
    [
        ("segmentation", 3, {}, {"dice", "hd95"}),
        ("classification", 2, {}, {"auc", "balanced_accuracy", "accuracy"}),
        ("classification", 3, {}, {"auc", "balanced_accuracy", "accuracy"}),
        ("enhancement", 2, {"enhancement": "denoise", "noise_std": 0.1}, {"psnr", "ssim"}),
        ("enhancement", 3, {"enhancement": "superres"}, {"psnr", "ssim"}),
    ],
)
def test_task_federation(tiny_config, kind: str, dims: int, task_extra: dict, metrics: set[str]) -> None:
    config = tiny_config(kind, dims, task=task_extra, baselines={"local_only": True})
    summary = simulate(config).summary
    for row in summary["sites"].values():
        assert metrics <= set(row["federated"])
        for name in metrics - {"hd95", "auc"}:  # hd95 / auc are nan when a tiny split has nothing to score
            assert math.isfinite(row["federated"][name])
        assert metrics <= set(row["local_only"])
