"""Calibration statistics: golden values worked out by hand, and a temperature fit that finds a known temperature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmed.tasks.calibration import (
    RELIABILITY_BINS,
    TEMPERATURES,
    VOXELS_PER_CASE,
    ece,
    fit_temperature,
    nll_sums,
    reliability_bins,
    scored_pairs,
)


def test_the_temperature_grid_spans_a_quarter_to_eight() -> None:
    assert len(TEMPERATURES) == 41
    assert TEMPERATURES[0] == pytest.approx(0.25) and TEMPERATURES[-1] == pytest.approx(8.0)
    assert TEMPERATURES[20] == pytest.approx(1.414213, rel=1e-5), "log-spaced: the middle is the geometric mean"


def test_ece_of_four_cases_in_four_bins_matches_the_hand_computation() -> None:
    # confidence 0.9 right, 0.8 wrong, 0.7 right, 0.65 right; each alone in its bin (width 1/15):
    # ECE = (|1 - .9| + |0 - .8| + |1 - .7| + |1 - .65|) / 4 = 1.55 / 4
    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.35, 0.65]])
    labels = torch.tensor([0, 1, 1, 1])
    table = reliability_bins(probabilities, labels)
    assert table.shape == (3, RELIABILITY_BINS)
    assert table[0].tolist() == [0] * 9 + [1, 1, 0, 1, 1, 0]  # bins 9 (0.65), 10 (0.7), 12 (0.8), 13 (0.9)
    assert table[2].sum() == 3
    assert ece(table) == pytest.approx(0.3875)


def test_ece_within_one_bin_compares_the_bins_mean_confidence_with_its_accuracy() -> None:
    # 0.91 and 0.93 share bin 13; one is right: |1 - (0.91 + 0.93)| / 2 = 0.42
    table = reliability_bins(torch.tensor([[0.91, 0.09], [0.93, 0.07]]), torch.tensor([0, 1]))
    assert table[:, 13].tolist() == pytest.approx([2.0, 1.84, 1.0])
    assert ece(table) == pytest.approx(0.42)
    assert math.isnan(ece(np.zeros((3, RELIABILITY_BINS))))
    # a confidence of exactly 1 belongs to the last bin
    assert reliability_bins(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))[0, -1] == 1


def test_bins_of_several_sites_add_up_to_the_pooled_bins() -> None:
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(60, 3, generator=generator) * 2, dim=1)
    labels = torch.randint(0, 3, (60,), generator=generator)
    parts = reliability_bins(probabilities[:25], labels[:25]) + reliability_bins(probabilities[25:], labels[25:])
    assert np.allclose(parts, reliability_bins(probabilities, labels))


def test_nll_sums_are_cross_entropy_sums_at_each_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    sums = nll_sums(logits, labels, temperatures=np.array([1.0, 2.0]))
    by_hand_t1 = math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))
    by_hand_t2 = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(0.5))
    assert sums.tolist() == pytest.approx([by_hand_t1, by_hand_t2])


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 4.0])
def test_the_grid_fit_recovers_a_known_temperature_from_site_sums(true_temperature: float) -> None:
    """Labels drawn from softmax(z / T): the summed NLL of three 'sites' is least near T."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(30000, 4, generator=generator) * 3.0
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=generator).reshape(-1)
    sums = sum(nll_sums(logits[part], labels[part]) for part in torch.arange(30000).chunk(3))
    fitted = fit_temperature(sums)
    assert abs(math.log(fitted / true_temperature)) < math.log(1.1), fitted
    # and scaling by the fitted temperature calibrates: ECE drops to sampling noise
    before = ece(reliability_bins(torch.softmax(logits, dim=1), labels))
    after = ece(reliability_bins(torch.softmax(logits / fitted, dim=1), labels))
    assert after < 0.02 and (true_temperature == 1.0 or after < before)


def test_segmentation_scores_a_bounded_seeded_subsample_of_voxels() -> None:
    logits = torch.randn(3, 80, 80)
    labels = torch.randint(0, 3, (1, 80, 80))
    rows, truth = scored_pairs(logits, labels, kind="segmentation")
    assert rows.shape == (VOXELS_PER_CASE, 3) and truth.shape == (VOXELS_PER_CASE,)
    again, _ = scored_pairs(logits, labels, kind="segmentation")
    assert torch.equal(rows, again), "the same voxels every time"
    small_rows, small_truth = scored_pairs(logits[:, :10, :10], labels[:, :10, :10], kind="segmentation")
    assert small_rows.shape == (100, 3) and torch.equal(small_truth, labels[0, :10, :10].reshape(-1))
    one, label = scored_pairs(torch.tensor([0.1, 2.0]), torch.tensor(1), kind="classification")
    assert one.shape == (1, 2) and label.tolist() == [1]
