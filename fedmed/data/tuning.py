"""A site's tuning split: training cases held out of training to stop a fine-tune and choose the delivered model;
for a small site, folds over all its training cases instead (a tuning split of one case is a coin toss).

Never the validation cases: those score the model, so choosing on them would overstate it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from fedmed.core.errors import FedmedError

if TYPE_CHECKING:
    from fedmed.config import EvaluationConfig

MAX_FOLDS = 5  # leave-one-out up to this many training cases, then this many folds


class TuningSplitError(FedmedError):
    """A site has too few training cases to hold some out for tuning."""


def tuning_split(count: int, *, fraction: float, seed: int, site: str) -> tuple[list[int], list[int]]:
    """Indices of the cases kept for training and of those held out (at least one of each), fixed by seed and site."""
    if fraction <= 0:
        return list(range(count)), []
    _check_count(count, site=site)
    held = _held_count(count, fraction=fraction)
    order = _order(count, seed=seed, site=site)
    return sorted(order[held:]), sorted(order[:held])


def cross_validates(count: int, *, evaluation: EvaluationConfig) -> bool:
    """Whether a site with `count` training cases chooses by folds: it fine-tunes (without Ditto) and its tuning
    split would hold fewer than evaluation.cross_validate_below cases."""
    if not evaluation.may_cross_validate:
        return False
    held = _held_count(count, fraction=evaluation.tuning_fraction) if evaluation.tuning_fraction > 0 else 0
    return held < evaluation.cross_validate_below


def choice_folds(count: int, *, seed: int, site: str) -> list[list[int]]:
    """The held-out indices of each fold: the cases shuffled (fixed by seed and site) and dealt onto
    min(count, MAX_FOLDS) folds, so every training case is held out exactly once."""
    _check_count(count, site=site)
    order = _order(count, seed=seed, site=site)
    folds = min(count, MAX_FOLDS)
    return [sorted(order[fold::folds]) for fold in range(folds)]


def _check_count(count: int, *, site: str) -> None:
    if count < 2:
        raise TuningSplitError(
            f"site {site}: {count} training case(s), too few to hold any out to choose a fine-tune or Ditto's model; "
            "give the site more training cases or set evaluation.finetune_epochs = 0 and evaluation.ditto_lambda = 0"
        )


def _held_count(count: int, *, fraction: float) -> int:
    return min(count - 1, max(1, round(fraction * count)))


def _order(count: int, *, seed: int, site: str) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}/{site}").shuffle(order)
    return order
