"""fedmed.tasks.surface gives MONAI's HD95 and mean surface distance (mm), from distance transforms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fedmed.tasks.surface import hd95_and_msd

SPACING = [0.8, 1.0, 3.0]


def _monai(labelmap: np.ndarray, truth: np.ndarray, *, num_classes: int) -> tuple[list[float], list[float]]:
    from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric
    from monai.networks.utils import one_hot

    prediction = one_hot(torch.as_tensor(labelmap)[None, None], num_classes=num_classes)
    reference = one_hot(torch.as_tensor(truth)[None, None], num_classes=num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty classes: MONAI warns and returns inf/nan
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        msd = SurfaceDistanceMetric(include_background=False, symmetric=True, reduction="none")
        return (
            hd95(prediction, reference, spacing=SPACING)[0].tolist(),
            msd(prediction, reference, spacing=SPACING)[0].tolist(),
        )


def test_matches_monai_on_a_shifted_speckled_prediction() -> None:
    truth = np.zeros((40, 36, 12), dtype=np.int64)
    truth[10:25, 8:20, 3:8] = 1
    truth[25:32, 8:20, 3:8] = 2
    rng = np.random.default_rng(0)
    labelmap = np.roll(truth, 2, axis=0)
    labelmap[rng.random(truth.shape) < 0.01] = 1  # speckle far from the structure
    ours = hd95_and_msd(labelmap, truth, num_classes=3, spacing=SPACING)
    theirs = _monai(labelmap, truth, num_classes=3)
    for mine, reference in zip(ours, theirs):
        assert mine == pytest.approx(reference, rel=1e-5)


def test_absent_class_is_nan() -> None:
    truth = np.zeros((16, 16, 8), dtype=np.int64)
    truth[4:10, 4:10, 2:6] = 1
    hd95, msd = hd95_and_msd(truth, truth, num_classes=3, spacing=SPACING)
    assert hd95[0] == pytest.approx(0.0) and msd[0] == pytest.approx(0.0)
    assert math.isnan(hd95[1]) and math.isnan(msd[1])  # class 2 in neither map


def test_per_class_and_per_region_distances_name_the_class_that_is_off() -> None:
    """Two classes, only the second shifted by two voxels along the 3 mm axis: its HD95 is the shift in mm, the
    first's is 0, and the means and the region (the union of both) follow under Dice's key names."""
    from fedmed.config import TaskConfig
    from fedmed.tasks.volumes import segmentation_case_metrics

    task = TaskConfig(
        kind="segmentation",
        spatial_dims=3,
        spacing=[1.0, 1.0, 1.0],
        num_classes=3,
        class_names=["oedema", "core"],
        regions={"lesion": [1, 2], "core_only": [2]},
    )
    truth = np.zeros((32, 32, 24), dtype=np.int64)
    truth[4:14, 6:20, 4:12] = 1
    truth[18:28, 6:20, 4:12] = 2
    prediction = truth.copy()
    prediction[prediction == 2] = 0
    prediction[18:28, 6:20, 6:14] = 2  # the core moved by 2 slices of 3 mm
    row = segmentation_case_metrics(
        torch.from_numpy(prediction)[None], torch.from_numpy(truth)[None], task=task, spacing=SPACING
    )
    assert row["hd95_oedema"] == pytest.approx(0.0) and row["msd_oedema"] == pytest.approx(0.0)
    assert row["hd95_core"] == pytest.approx(6.0)  # 2 voxels x 3 mm
    assert 0.0 < row["msd_core"] < 6.0
    assert row["hd95"] == pytest.approx(3.0) and row["msd"] == pytest.approx(row["msd_core"] / 2)
    assert row["hd95_core_only"] == row["hd95_core"] and row["msd_core_only"] == row["msd_core"]
    assert 0.0 < row["hd95_lesion"] <= 6.0
    assert row["dice_oedema"] == pytest.approx(1.0) and row["dice_core"] == pytest.approx(0.75)
    assert {key.split("_", 1)[1] for key in row if key.startswith("hd95_")} == {"oedema", "core", "lesion", "core_only"}


def test_one_foreground_class_keeps_one_mean_and_names_only_its_regions() -> None:
    from fedmed.config import TaskConfig
    from fedmed.tasks.volumes import segmentation_case_metrics

    task = TaskConfig(kind="segmentation", spatial_dims=3, spacing=[1.0, 1.0, 1.0], regions={"lesion": [1]})
    truth = np.zeros((16, 16, 8), dtype=np.int64)
    truth[4:10, 4:10, 2:6] = 1
    moved = torch.roll(torch.from_numpy(truth), shifts=1, dims=0)
    row = segmentation_case_metrics(moved[None], torch.from_numpy(truth)[None], task=task, spacing=SPACING)
    assert row["hd95"] == pytest.approx(0.8) and row["hd95_lesion"] == row["hd95"]  # one voxel of 0.8 mm
    assert sorted(key for key in row if key.startswith(("hd95", "msd"))) == ["hd95", "hd95_lesion", "msd", "msd_lesion"]
