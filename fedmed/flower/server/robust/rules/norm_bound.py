"""norm_bound: every update scaled down to at most a multiple of the round's median update norm, then averaged.

Norm bounding is the standard defence against scaled-up and backdoor updates (Sun et al. 2019, "Can you really
backdoor federated learning?"). The bound follows the round's median norm, so it shrinks as training
converges and needs no absolute value per task; a minority of sites cannot move the median.
"""

from __future__ import annotations

import numpy as np

from .registry import RULES, Aggregation, RoundUpdates


@RULES.register("norm_bound")
def norm_bound(round_updates: RoundUpdates) -> Aggregation:
    norms = [round_updates.updates.norms[site] for site in round_updates.sites]
    bound = round_updates.settings.norm_bound_multiple * float(np.median(norms))
    scales = {
        site: (min(1.0, bound / norm) if norm > 0 else 1.0)
        for site, norm in zip(round_updates.sites, norms, strict=True)
    }
    return Aggregation(scales=scales, record={"norm_bound": bound})
