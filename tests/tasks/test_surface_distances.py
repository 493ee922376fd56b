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
