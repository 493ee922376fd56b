"""Test-time augmentations undo exactly; entropy and per-case scores have known values."""

from __future__ import annotations

import math

import pytest
import torch

from fedmed.tasks.uncertainty import (
    InvertibleAugmentation,
    normalized_entropy,
    segmentation_score,
    spread,
    tta_augmentations,
)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("flips", [True, False])
def test_every_augmentation_is_undone_exactly(dims: int, flips: bool) -> None:
    tensor = torch.arange(2 * 5**dims, dtype=torch.float32).reshape(2, *[5] * dims)
    augmentations = tta_augmentations(dims, trained_with_flips=flips)
    assert len(augmentations) == (dims + 1 if flips else dims + 2)
    for augmentation in augmentations:
        changed = augmentation.apply(tensor)
        assert not torch.equal(changed, tensor)
        if augmentation.gain == 1.0:  # a gain changes the input only: the output is on the same grid
            assert torch.equal(augmentation.undo(changed), tensor)


def test_without_trained_flips_no_flip_is_used() -> None:
    # The hippocampus model tells anterior from posterior by position: a flip it never saw swaps them.
    assert all(not augmentation.flip for augmentation in tta_augmentations(3, trained_with_flips=False))
    assert tta_augmentations(3, trained_with_flips=True, count=2) == [
        InvertibleAugmentation(flip=(1,)),
        InvertibleAugmentation(flip=(2,)),
    ]


def test_normalized_entropy_is_zero_when_certain_and_one_for_a_coin_toss() -> None:
    probabilities = torch.tensor([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]])
    entropy = normalized_entropy(probabilities)[0]
    assert entropy[0] == pytest.approx(0.0, abs=1e-6)
    assert entropy[1] == pytest.approx(math.log(2) / math.log(3), abs=1e-6)
    assert entropy[2] == pytest.approx(1.0, abs=1e-6)


def test_segmentation_score_averages_over_the_foreground_support_only() -> None:
    probabilities = torch.tensor([[1.0, 1.0, 0.5, 0.2], [0.0, 0.0, 0.5, 0.8]])  # background, foreground
    entropy = normalized_entropy(probabilities)
    expected = (1.0 + float(normalized_entropy(torch.tensor([[0.2], [0.8]]))[0, 0])) / 2
    assert segmentation_score(probabilities, entropy) == pytest.approx(expected, abs=1e-6)
    assert segmentation_score(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.zeros(1, 2)) == 0.0


def test_spread_is_the_standard_deviation_across_passes() -> None:
    passes = torch.tensor([[[0.0, 1.0]], [[2.0, 1.0]]])
    assert torch.allclose(spread(passes), torch.tensor([[1.0, 0.0]]))
