"""The out-of-distribution score: the deepest pooled feature map of fedmed's networks, and its golden values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.tasks.ood import (
    OOD_SCORE_EDGES,
    FeatureCollector,
    ood_score,
    score_histogram,
    threshold_from_histogram,
)


def test_the_score_is_the_mean_squared_standardized_distance() -> None:
    # ((1 - 0)^2 / 1 + (2 - 0)^2 / 4) / 2 = 1
    assert ood_score(np.array([1.0, 2.0]), mean=[0.0, 0.0], var=[1.0, 4.0]) == pytest.approx(1.0, rel=1e-5)
    assert ood_score(np.array([3.0, 3.0]), mean=[3.0, 3.0], var=[1.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match="another network"):
        ood_score(np.zeros(3), mean=[0.0, 0.0], var=[1.0, 1.0])


def test_the_threshold_leaves_at_most_five_percent_of_the_scores_above_it() -> None:
    scores = np.linspace(0.5, 50.0, 400)
    counts = score_histogram(scores)
    assert counts.sum() == 400 and len(counts) == len(OOD_SCORE_EDGES) - 1
    threshold = threshold_from_histogram(counts)
    assert threshold is not None
    assert np.mean(scores > threshold) <= 0.05
    assert np.quantile(scores, 0.95) <= threshold <= np.quantile(scores, 0.95) * 1.1, "one bin (~10 %) at most"
    # pooling two sites' histograms is the histogram of their pooled scores
    assert np.array_equal(score_histogram(scores[:150]) + score_histogram(scores[150:]), counts)
    assert threshold_from_histogram(np.zeros_like(counts)) is None


def _monai_networks() -> dict[str, tuple[torch.nn.Module, torch.Tensor, int]]:
    from monai.networks.nets import BasicUNet, DenseNet121, DynUNet, UNet, resnet18

    return {
        "UNet": (UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), norm="instance"), torch.rand(2, 1, 32, 32), 32),
        "BasicUNet": (BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)), torch.rand(2, 1, 32, 32), 16),
        "DynUNet": (
            DynUNet(2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 12]),
            torch.rand(2, 1, 32, 32),
            12,
        ),
        "DenseNet121": (DenseNet121(spatial_dims=2, in_channels=1, out_channels=2), torch.rand(2, 1, 32, 32), 1024),
        "ResNet18": (resnet18(spatial_dims=2, n_input_channels=1, num_classes=2), torch.rand(2, 1, 32, 32), 512),
    }


@pytest.mark.parametrize("name", ["UNet", "BasicUNet", "DynUNet", "DenseNet121", "ResNet18"])
def test_the_collector_records_the_deepest_feature_map_of_each_network(name: str) -> None:
    model, image, deepest_channels = _monai_networks()[name]
    model.eval()
    with torch.no_grad(), FeatureCollector(model) as collector:
        model(image)
        first = collector.rows()
        assert collector.groups[1] == 2 * deepest_channels, "the deepest map's mean and spread per channel"
        assert first.shape == (2, sum(collector.groups)), "one row per batch item: the first map's part, the deepest's"
        collector.reset()
        model(image)
        assert np.allclose(collector.rows(), first), "the same module every call"
        assert np.allclose(collector.case_vector(), first.mean(axis=0))
    with torch.no_grad():
        model(image)
    assert collector.rows().shape == (2, sum(collector.groups)), "hooks removed on exit"


def test_fedmeds_own_networks_and_the_enhancer() -> None:
    from fedmed.config import ModelConfig, TaskConfig
    from fedmed.models import build_model

    for task in (
        TaskConfig(kind="segmentation", spatial_dims=2, image_size=[32, 32]),
        TaskConfig(kind="classification", spatial_dims=2, image_size=[32, 32]),
        TaskConfig(kind="enhancement", spatial_dims=3, image_size=[16, 16, 16]),
    ):
        model = build_model(task, ModelConfig(channels=[8, 16])).eval()
        with torch.no_grad(), FeatureCollector(model) as collector:
            model(torch.rand(3, 1, *task.image_size))
        rows = collector.rows()
        assert rows.shape[0] == 3 and rows.shape[1] >= 8 and np.isfinite(rows).all(), task.kind


def test_a_sliding_window_case_vector_is_the_mean_over_its_windows() -> None:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    model = UNet(2, 1, 2, channels=(4, 8), strides=(2,), norm="instance").eval()
    image = torch.rand(1, 1, 48, 48)
    with torch.no_grad(), FeatureCollector(model) as collector:
        sliding_window_inference(image, roi_size=(16, 16), sw_batch_size=4, predictor=model, overlap=0.0)
        rows = collector.rows()
        assert collector.groups == (8, 16), "4 channels in the first map, 8 at the bottom: mean and spread of each"
        assert rows.shape == (9, 24), "3 x 3 windows"
        assert np.allclose(collector.case_vector(), rows.mean(axis=0))
        collector.reset()
        with pytest.raises(ValueError, match="no forward call"):
            collector.case_vector()


def test_each_group_is_scored_on_its_own_and_the_larger_wins() -> None:
    # A case typical in its deep features but far off in its first map (noise) scores as far off as that map.
    vector = np.array([3.0, 0.0, 0.0, 0.0])
    mean, var = [0.0] * 4, [1.0] * 4
    assert ood_score(vector, mean=mean, var=var) == pytest.approx(9.0 / 4, rel=1e-5)
    assert ood_score(vector, mean=mean, var=var, groups=[1, 3]) == pytest.approx(9.0, rel=1e-5)
    with pytest.raises(ValueError, match="another network"):
        ood_score(vector, mean=mean, var=var, groups=[1, 2])
