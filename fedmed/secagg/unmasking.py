"""The end of a SecAgg+ round on the server: rebuild the secrets from their shares, strip the masks, decode.

The server passes its `_fail` in: a rebuilt secret that does not match, or a sum that does not decode,
ends the whole round with SecAggRoundError rather than returning a partial or unverified aggregate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from fedmed.secagg import messages as m
from fedmed.secagg.encoding import VectorLayout, decode_sum, unflatten
from fedmed.secagg.masking import SEED_BYTES, apply_pairwise, pairwise_mask, public_key_of, seed_commitment, self_mask
from fedmed.secagg.primitives import combine_shares
from fedmed.secagg.quantize import dequantize_mean
from fedmed.secagg.settings import SecAggSettings

Fail = Callable[..., NoReturn]  # SecAggServer._fail(stage, reason, *, fix)


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked aggregate of one round.

    mean_update: sum_i w_i delta_i / sum_i w_i over `sites_aggregated`, float32, in the round's shapes,
        within `max_quantization_error` (per element) of the exact mean of the clipped updates.
    total_weight: sum_i w_i over the aggregated sites (the server never sees an individual w_i).
    extra_sums: per-position sums of the sites' extra_counts (int64), None if the round had none.
    sites_dropped: node -> stage at which it was lost; those sites are not in the mean.
    sites_silent_at_unmask: aggregated sites that did not answer the unmask stage (tolerated).
    clipped_values: update values clipped to +-clipping_range, summed over the aggregated sites.
    """

    mean_update: list[np.ndarray]
    total_weight: int
    extra_sums: np.ndarray | None
    sites_aggregated: list[int]
    sites_dropped: dict[int, str]
    max_quantization_error: float
    clipped_values: int
    sites_silent_at_unmask: list[int] = field(default_factory=list)


def remove_masks(
    total: np.ndarray,
    *,
    seed_shares: Mapping[int, list[bytes]],
    key_shares: Mapping[int, list[bytes]],
    threshold: int,
    round_id: str,
    length: int,
    commitments: Mapping[int, bytes],
    pk1: Mapping[int, bytes],
    nbrs: Mapping[int, frozenset[int]],
    masked: set[int],
    fail: Fail,
) -> None:
    """Strip, in place, every survivor's self mask and the pairwise masks survivors added for dropped nodes."""
    for owner in sorted(seed_shares):
        seed = _combine(seed_shares[owner], owner=owner, what="self-mask seed", threshold=threshold, fail=fail)
        if len(seed) != SEED_BYTES or seed_commitment(seed, round_id=round_id) != commitments[owner]:
            fail(
                m.UNMASK,
                f"the rebuilt self-mask seed of node {owner} does not match its commitment (corrupt shares)",
                fix="rerun the round; if it recurs, check the sites' fedmed versions",
            )
        total -= self_mask(seed, round_id=round_id, length=length, dtype=total.dtype.type)
    for owner in sorted(key_shares):
        sk1 = _combine(key_shares[owner], owner=owner, what="mask key", threshold=threshold, fail=fail)
        try:
            matches = public_key_of(sk1) == pk1[owner]
        except (ValueError, TypeError):
            matches = False
        if not matches:
            fail(
                m.UNMASK,
                f"the rebuilt mask key of dropped node {owner} does not match its public key (corrupt shares)",
                fix="rerun the round; if it recurs, check the sites' fedmed versions",
            )
        # Only survivors' vectors carry a mask shared with the dropped node; undo each of them.
        for peer in sorted((nbrs[owner] & masked) - {owner}):
            mask = pairwise_mask(sk1, pk1[peer], round_id=round_id, length=length, dtype=total.dtype.type)
            apply_pairwise(total, mask, adder=peer, other=owner, sign=-1)


def decode_result(
    total: np.ndarray,
    *,
    layout: VectorLayout,
    settings: SecAggSettings,
    shapes: Sequence[tuple[int, ...]],
    sites_aggregated: list[int],
    sites_dropped: dict[int, str],
    sites_silent_at_unmask: list[int],
    fail: Fail,
) -> SecAggResult:
    """The mean update from the unmasked sum, once its weight and range show that every mask cancelled."""
    decoded = decode_sum(total, layout=layout)
    s = settings
    weight = decoded.total_weight
    if not 1 <= weight <= s.max_total_weight:
        fail(
            m.UNMASK,
            f"the total weight of the aggregated sites is {weight}, outside [1, "
            f"max_total_weight={s.max_total_weight}], so the weighted sum may have wrapped modulo 2^{s.field_bits}",
            fix=f"set SecAggSettings.max_total_weight to at least {max(weight, 1)} (the training "
            "examples of all sites in one round) and rerun",
        )
    # Each element is sum_i w_i q_i <= W * L; anything larger means a mask was not removed.
    if decoded.weighted_sum.size and int(decoded.weighted_sum.max()) > weight * s.levels:
        fail(
            m.UNMASK,
            "the unmasked sum is out of range: masks did not cancel",
            fix="rerun the round; check that every site runs the same fedmed version",
        )
    mean = dequantize_mean(
        decoded.weighted_sum, total_weight=weight, clipping_range=float(s.clipping_range), levels=s.levels
    )
    return SecAggResult(
        mean_update=unflatten(mean, shapes),
        total_weight=weight,
        extra_sums=decoded.extra_sums,
        sites_aggregated=sites_aggregated,
        sites_dropped=sites_dropped,
        max_quantization_error=s.max_quantization_error,
        clipped_values=decoded.clipped_values,
        sites_silent_at_unmask=sites_silent_at_unmask,
    )


def _combine(shares: list[bytes], *, owner: int, what: str, threshold: int, fail: Fail) -> bytes:
    try:
        # Any `threshold` shares determine the secret; more add only work.
        return combine_shares(shares[:threshold])
    except (ValueError, IndexError):
        fail(
            m.UNMASK,
            f"the {what} of node {owner} could not be rebuilt from its shares (corrupt shares)",
            fix="rerun the round; if it recurs, check the sites' fedmed versions",
        )
