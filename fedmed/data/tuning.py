"""A site's tuning split: training cases held out of training to stop a fine-tune and choose the delivered model.

Never the validation cases: those score the model, so choosing on them would overstate it.
"""

from __future__ import annotations

import random

from fedmed.core.errors import FedmedError


class TuningSplitError(FedmedError):
    """A site has too few training cases to hold some out for tuning."""


def tuning_split(count: int, *, fraction: float, seed: int, site: str) -> tuple[list[int], list[int]]:
    """Indices of the cases kept for training and of those held out (at least one of each), fixed by seed and site."""
    if fraction <= 0:
        return list(range(count)), []
    if count < 2:
        raise TuningSplitError(
            f"site {site}: {count} training case(s), too few to hold out a tuning split for fine-tuning or Ditto; "
            "give the site more training cases or set evaluation.finetune_epochs = 0 and evaluation.ditto_lambda = 0"
        )
    held = min(count - 1, max(1, round(fraction * count)))
    order = list(range(count))
    random.Random(f"{seed}/{site}").shuffle(order)
    return sorted(order[held:]), sorted(order[:held])
