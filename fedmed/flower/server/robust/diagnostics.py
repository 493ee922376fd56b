"""Each site's contribution to a round, measured against the round's robust centre.

A site is judged against the others, never against a fixed expectation: honest sites on different scanners
send different updates. The centre is the coordinate-wise median of all the round's updates, which a
minority of bad sites cannot move far (a mean of "the others" would be dragged by a bad site: with three
sites, one update of -10 x would turn both honest sites' cosines negative). Two criteria, each relative to
the round:

- length: an update much longer than the median update (a broken scale, an exploding training, an update
  multiplied up). Adam-style optimizers take steps of about the learning rate whatever the data, so honest
  updates are all about as long, and broken data rarely shows here;
- direction: an update whose cosine to the centre is far below the sites' median cosine (flipped labels,
  a broken label export, a sign flip). How well honest updates agree changes over a run (near 0.9 early,
  toward 0 late in the demo), so the gap to the round's median cosine is judged, not the cosine itself.

Either criterion flags an update: it is left out, and counts towards quarantine. An honest site of another
population looks exactly like a broken label export here (a small skull-stripped BraTS site beside three IXI sites
fell 0.3-0.7 below the median cosine with a positive cosine, as an inverted label export did), so the updates cannot
tell them apart; a person can. Once the coordinator has re-admitted a quarantined site (its admin has checked the
data), the site is *vouched for*: an update of it far from the others but still pointing their way is *unusual*,
kept with its weight scaled by its cosine over the median cosine, and not counted; an oversized update, or one
pointing against the others (a negative cosine), is still flagged.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from fedmed.config import RobustConfig

from .updates import HeldUpdates, Updates

# With two sites the median is their mean: neither can be called the outlier.
MIN_SITES_TO_FLAG = 3


@dataclass(frozen=True)
class Contribution:
    """One site's update in one round, as the coordinator measured it."""

    update_norm: float
    norm_ratio: float  # its norm / the median norm of the round's updates
    cosine: float  # to the coordinate-wise median of the round's updates
    cosine_gap: float  # the sites' median cosine minus this one
    score: float  # >= 1: flagged or unusual; the larger of the norm and the direction criteria over their thresholds
    flagged: bool  # left out, counts towards quarantine
    unusual: bool = False  # a vouched-for site far from the others but pointing their way: kept, weighted by `trust`
    trust: float = 1.0  # the factor on its aggregation weight: its cosine over the sites' median cosine if unusual

    def evidence(self) -> str:
        return (
            f"update norm {self.norm_ratio:.2g}× the round's median, cosine {self.cosine:+.2f} to the median update "
            f"({self.cosine_gap:+.2f} below the sites' median cosine)"
        )


def measure(
    updates: Updates | Mapping[str, np.ndarray], *, settings: RobustConfig, vouched: Collection[str] = ()
) -> dict[str, Contribution]:
    """Every site's contribution; `updates` are the flat update vectors (local - global) by site, `vouched` the
    sites the coordinator re-admitted."""
    if isinstance(updates, Mapping):
        updates = HeldUpdates(updates)
    names = sorted(updates.norms)
    norms = updates.norms
    judged = len(names) >= MIN_SITES_TO_FLAG
    median_norm = float(np.median(list(norms.values())))
    # The centre is built a slice at a time; only its products with the updates are kept.
    products, centre_squared = np.zeros(len(names)), 0.0
    for _, block in updates.slices(names):
        centre = np.median(block, axis=0)
        products += block @ centre
        centre_squared += float(centre @ centre)
    centre_norm = float(np.sqrt(centre_squared))
    cosines = {
        name: _cosine(float(product), norms[name] * centre_norm) for name, product in zip(names, products, strict=True)
    }
    median_cosine = float(np.median(list(cosines.values())))
    contributions = {}
    for name in names:
        ratio = _ratio(norms[name], median_norm)
        gap = median_cosine - cosines[name]
        # Each criterion divided by its threshold: 1 flags.
        score = max(ratio / settings.flag_norm_ratio, max(0.0, gap) / settings.flag_cosine_gap)
        oversized = ratio >= settings.flag_norm_ratio
        far = gap >= settings.flag_cosine_gap
        flagged = judged and (oversized or (far and (cosines[name] < 0 or name not in vouched)))
        unusual = judged and far and not flagged
        # An unusual cosine is >= 0 and at least flag_cosine_gap below the median, so the median is positive.
        trust = min(1.0, cosines[name] / median_cosine) if unusual else 1.0
        contributions[name] = Contribution(
            norms[name], ratio, cosines[name], gap, score, flagged=flagged, unusual=unusual, trust=trust
        )
    return contributions


def _ratio(norm: float, reference: float) -> float:
    if reference > 0:
        return norm / reference
    return 1.0 if norm == 0 else float("inf")


def _cosine(product: float, denominator: float) -> float:
    # A zero update (a site that took no step) or centre has no direction: it neither agrees nor disagrees.
    return product / denominator if denominator > 0 else 0.0
