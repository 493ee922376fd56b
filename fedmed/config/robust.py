"""[robust]: how the coordinator guards the federation against a faulty or hostile site.

Every round each site's update is measured against the round's robust centre (its norm against the median
norm, its cosine to the coordinate-wise median update against the other sites' cosines), the robust rule
aggregates, and a site flagged in `quarantine_after` of its last `quarantine_window` rounds is left out until
the coordinator re-admits it; from then on an update of that site that still points the federation's way is kept,
down-weighted, and not counted (fedmed.flower.server.robust).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig

# Rules that read every single update: under SecAgg+ the coordinator holds only the masked sum.
RULES_NEEDING_EACH_UPDATE = ("median", "trimmed_mean", "krum", "multi_krum")


class RobustConfig(StrictModel):
    rule: str = Field(
        "norm_bound",
        description="aggregation rule (registry key): mean, norm_bound (each update clipped to norm_bound_multiple × "
        "the round's median update norm, then the run's strategy averages), median, trimmed_mean, krum, multi_krum",
    )
    norm_bound_multiple: float = Field(
        2.0, gt=0, description="norm_bound: an update longer than this × the round's median update norm is scaled down"
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: fraction of the sites cut at each end, per coordinate"
    )
    byzantine_sites: int = Field(1, ge=0, description="krum, multi_krum: how many sites may be bad (f)")
    krum_select: int | None = Field(
        None, ge=1, description="multi_krum: updates averaged (default: sites - byzantine_sites)"
    )
    leave_out_flagged: bool = Field(
        True, description="leave an update flagged this round out of this round's aggregate (it is still shown)"
    )
    down_weight_unusual: bool = Field(
        True,
        description="an unusual update (from a site the coordinator re-admitted: far below the others' cosine but "
        "still pointing their way, as an honest site of another population's is) is kept with its weight scaled by "
        "its cosine over the sites' median cosine; false: kept at full weight (it is still shown)",
    )
    flag_norm_ratio: float = Field(
        4.0, gt=1, description="flag an update longer than this × the median norm of the round's updates"
    )
    flag_cosine_gap: float = Field(
        0.3,
        gt=0,
        le=2,
        description="flag an update whose cosine to the round's coordinate-wise median update is this far below the "
        "sites' median cosine, or for a re-admitted site only if its cosine is also negative, else call it unusual "
        "(honest drifted sites stayed within 0.17 of it in the demo and the drift benchmark; flipped labels fell 0.9 "
        "below from round 1; a small honest site of another population 0.3-0.7 below)",
    )
    quarantine_after: int = Field(
        3,
        ge=0,
        description="leave a site out once it is flagged in this many of its last quarantine_window rounds "
        "(0: never quarantine)",
    )
    quarantine_window: int = Field(
        6,
        ge=1,
        description="quarantine_after counts the flags of a site's latest this-many rounds (broken labels "
        "were flagged every other round in the benchmark)",
    )
    max_case_ratio: float = Field(
        10.0,
        ge=1,
        description="a site's aggregation weight (its training cases) is capped at this × the median of the sites' "
        "counts, so no site can claim the federation",
    )
    max_cases: int = Field(
        100_000, ge=1, description="a reply claiming more training cases than this is refused as implausible"
    )
    update_norm_bound: float | None = Field(
        None,
        gt=0,
        description="with secagg: each site's own code scales its update down to this L2 norm before masking (the "
        "coordinator cannot see single updates); the coordinator checks the unmasked mean against it",
    )


def check_robust(run: RunConfig) -> None:
    """Rules that need each update cannot run where the coordinator never sees one."""
    rule = run.robust.rule
    if run.robust.quarantine_after > run.robust.quarantine_window:
        raise ValueError(
            f"robust.quarantine_after ({run.robust.quarantine_after}) flags cannot fit in robust.quarantine_window "
            f"({run.robust.quarantine_window}) rounds; raise quarantine_window or lower quarantine_after"
        )
    if run.secagg.enabled and rule in RULES_NEEDING_EACH_UPDATE:
        raise ValueError(
            f"robust.rule '{rule}' needs every site's update, but with secagg.enabled the coordinator sees only "
            "their masked sum; use robust.rule = 'norm_bound' with robust.update_norm_bound, which each site "
            "enforces on its own update before masking"
        )
    if run.client_dp.enabled and rule in RULES_NEEDING_EACH_UPDATE:
        raise ValueError(
            f"robust.rule '{rule}' cannot run under client_dp: the noise is calibrated for the mean of clipped "
            "updates, and a median or selection can move by a whole update when one site changes; use "
            "robust.rule = 'norm_bound' (client_dp's clipping already bounds every update)"
        )
    if rule in ("krum", "multi_krum") and run.site_names:
        needed = 2 * run.robust.byzantine_sites + 3
        if len(run.site_names) < needed:
            raise ValueError(
                f"robust.rule '{rule}' with robust.byzantine_sites = {run.robust.byzantine_sites} needs at least "
                f"{needed} sites (2f + 3), the federation has {len(run.site_names)}; lower byzantine_sites or use "
                "robust.rule = 'median'"
            )
    if run.robust.update_norm_bound is not None and not run.secagg.enabled:
        raise ValueError(
            "robust.update_norm_bound applies under secagg only (each site bounds its update before masking); "
            "without secagg the coordinator sees every update: use robust.rule = 'norm_bound' and "
            "robust.norm_bound_multiple"
        )
