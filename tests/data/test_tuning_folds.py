"""Which cases choose a site's delivered model: the tuning split, or folds over every training case when that
split would be too small to judge by."""

from __future__ import annotations

import pytest

from fedmed.config import EvaluationConfig
from fedmed.data.tuning import TuningSplitError, choice_folds, cross_validates


@pytest.mark.parametrize(("count", "folds"), [(2, 2), (5, 5), (12, 5)])
def test_every_training_case_is_held_out_exactly_once(count: int, folds: int) -> None:
    held = choice_folds(count, seed=0, site="a")
    assert len(held) == folds
    assert sorted(index for fold in held for index in fold) == list(range(count))
    assert max(map(len, held)) - min(map(len, held)) <= 1
    assert held == choice_folds(count, seed=0, site="a")
    if count > folds:  # leave-one-out has nothing to shuffle
        assert held != choice_folds(count, seed=0, site="b")


def test_a_single_training_case_cannot_be_cross_validated() -> None:
    with pytest.raises(TuningSplitError, match="site a: 1 training case"):
        choice_folds(1, seed=0, site="a")


@pytest.mark.parametrize(
    ("settings", "count", "expected"),
    [
        ({"finetune_epochs": 20}, 5, True),  # a tuning split of 1
        ({"finetune_epochs": 20}, 22, True),  # of 4
        ({"finetune_epochs": 20}, 23, False),  # of 5: enough to judge by
        ({"finetune_epochs": 20, "tuning_fraction": 0.5}, 9, True),
        ({"finetune_epochs": 20, "tuning_fraction": 0.5}, 10, False),
        ({"finetune_epochs": 20, "tuning_fraction": 0.0}, 100, True),  # no tuning split at all
        ({"finetune_epochs": 20, "cross_validate_below": 0}, 5, False),
        ({"finetune_epochs": 20, "ditto_lambda": 0.1}, 5, False),  # Ditto's model trains through the run
        ({"finetune_epochs": 0}, 5, False),
    ],
)
def test_a_site_cross_validates_when_its_tuning_split_would_be_small(settings, count: int, expected: bool) -> None:
    assert cross_validates(count, evaluation=EvaluationConfig(**settings)) is expected
