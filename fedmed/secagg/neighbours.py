"""Who shares secrets with whom: the neighbourhood graph and the reconstruction threshold.

Up to COMPLETE_GRAPH_MAX_SITES sites every site neighbours every other (SecAgg+ is then SecAgg).
Beyond that, as in Flower's SecAgg+ workflow, the node ids are shuffled onto a ring and each site
neighbours the k // 2 sites on either side: masks and shares cost O(k) per site instead of O(n).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedmed.secagg.errors import SecAggInputError

COMPLETE_GRAPH_MAX_SITES = 10


def neighbourhood_size(num_sites: int, num_shares: int | None) -> int:
    """k, the number of sites (including itself) each site shares its secrets with."""
    if num_sites <= COMPLETE_GRAPH_MAX_SITES:
        return num_sites
    k = num_shares if num_shares is not None else max(11, 2 * math.ceil(math.log2(num_sites)) + 1)
    return min(k, num_sites)


def build_neighbourhoods(
    node_ids: Sequence[int], *, num_shares: int | None, rng: random.Random
) -> dict[int, frozenset[int]]:
    """node id -> its neighbourhood, itself included; symmetric (v in N(u) iff u in N(v))."""
    ids = list(node_ids)
    n = len(ids)
    k = neighbourhood_size(n, num_shares)
    if k >= n:
        everyone = frozenset(ids)
        return dict.fromkeys(ids, everyone)
    # The shuffle keeps the ring from following the id order a site could choose by re-registering.
    rng.shuffle(ids)
    half = k // 2
    return {nid: frozenset(ids[(idx + offset) % n] for offset in range(-half, half + 1)) for idx, nid in enumerate(ids)}


def resolve_threshold(requested: int | None, *, neighbourhood: int) -> int:
    """t: shares needed to rebuild a secret. Default: a majority of the neighbourhood."""
    if requested is None:
        return max(2, neighbourhood // 2 + 1)
    if requested > neighbourhood:
        raise SecAggInputError(
            f"reconstruction_threshold={requested} exceeds the neighbourhood size {neighbourhood} "
            "(sites holding shares of each secret), so no secret could ever be rebuilt; lower it to at "
            f"most {neighbourhood} or leave it unset for a majority"
        )
    return requested
