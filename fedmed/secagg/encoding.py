"""The uint32 vector one site contributes, and how the server decodes the unmasked sum.

Layout (length num_params + 2 + extra_length):
    [0, P)        w * q      the site's quantised update times its weight (w * L <= 2^32 - 1)
    P             w          its weight, so the server learns only the total W = sum w
    P + 1         clipped    how many update values were clipped, so only the total is learnt
    P + 2 ...     extra      optional small signed integers (e.g. DP norm-bit counts), two's complement
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmed.secagg.errors import SecAggInputError
from fedmed.secagg.quantize import MODULUS, quantize

_INT32_LIMIT = 2**31


@dataclass(frozen=True)
class VectorLayout:
    num_params: int
    extra_length: int = 0

    @property
    def weight_index(self) -> int:
        return self.num_params

    @property
    def clipped_index(self) -> int:
        return self.num_params + 1

    @property
    def extra_start(self) -> int:
        return self.num_params + 2

    @property
    def length(self) -> int:
        return self.num_params + 2 + self.extra_length


@dataclass(frozen=True)
class DecodedSum:
    weighted_sum: np.ndarray  # uint32, sum_i w_i q_i
    total_weight: int
    clipped_values: int
    extra_sums: np.ndarray | None  # int64


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of a list of arrays taken as one flat vector, accumulated in float64: what a site bounds
    (robust.update_norm_bound) and what the coordinator checks on the unmasked mean."""
    total = 0.0
    for array in arrays:
        flat = np.asarray(array, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def flatten_update(update: Sequence[np.ndarray], *, num_params: int) -> np.ndarray:
    """One flat float vector from a list of arrays (the layout both sides agree on: C order)."""
    if isinstance(update, np.ndarray):
        update = [update]
    arrays = [np.asarray(a) for a in update]
    for index, array in enumerate(arrays):
        if not np.issubdtype(array.dtype, np.floating):
            raise SecAggInputError(
                f"update array {index} has dtype {array.dtype}; pass the float update (local - global)"
            )
    size = sum(a.size for a in arrays)
    if size != num_params:
        raise SecAggInputError(
            f"the update has {size} values but this round aggregates {num_params}; the site and the "
            "coordinator must use the same model layout"
        )
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([a.ravel() for a in arrays])


def unflatten(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def encode_contribution(
    flat_update: np.ndarray,
    *,
    weight: int,
    extra_counts: Sequence[int] | None,
    layout: VectorLayout,
    clipping_range: float,
    levels: int,
    max_total_weight: int,
    num_sites: int,
) -> tuple[np.ndarray, int]:
    """The unmasked uint32 vector of one site and the number of values clipped."""
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or not 1 <= weight <= max_total_weight:
        raise SecAggInputError(
            f"site weight {weight!r} must be an integer in [1, max_total_weight={max_total_weight}]: "
            "larger weights could wrap the uint32 sum; raise SecAggSettings.max_total_weight on the "
            "coordinator to at least the total number of training examples of a round"
        )
    weight = int(weight)
    vector = np.empty(layout.length, dtype=np.uint32)
    levels_vec, clipped = quantize(flat_update, clipping_range=clipping_range, levels=levels)
    # w * q <= max_total_weight * L <= 2^32 - 1: exact in uint32.
    np.multiply(levels_vec, np.uint32(weight), out=vector[: layout.num_params])
    vector[layout.weight_index] = weight
    vector[layout.clipped_index] = clipped
    vector[layout.extra_start :] = _encode_extra(extra_counts, layout=layout, num_sites=num_sites)
    return vector, clipped


def _encode_extra(extra_counts: Sequence[int] | None, *, layout: VectorLayout, num_sites: int) -> np.ndarray:
    if extra_counts is None:
        if layout.extra_length:
            raise SecAggInputError(
                f"this round also sums {layout.extra_length} extra counts per site; pass extra_counts "
                f"with {layout.extra_length} integers to mask()"
            )
        return np.zeros(0, dtype=np.uint32)
    counts = np.asarray(extra_counts)
    if (
        counts.ndim != 1
        or counts.size != layout.extra_length
        or (counts.size and not np.issubdtype(counts.dtype, np.integer))
    ):
        raise SecAggInputError(
            f"extra_counts must be {layout.extra_length} integers, got {counts.size} of dtype "
            f"{counts.dtype}; the coordinator's extra_length and the site's counts must match"
        )
    counts = counts.astype(np.int64)
    # The sum of num_sites values must stay inside int32 so its two's complement decodes exactly.
    limit = _INT32_LIMIT // num_sites
    if counts.size and int(np.abs(counts).max()) >= limit:
        raise SecAggInputError(
            f"extra count {int(np.abs(counts).max())} is too large: with {num_sites} sites each must "
            f"satisfy |count| < {limit}; extra counts are for small integers such as DP norm bits"
        )
    return (counts % MODULUS).astype(np.uint32)


def decode_sum(total: np.ndarray, *, layout: VectorLayout) -> DecodedSum:
    extra = total[layout.extra_start :].view(np.int32).astype(np.int64) if layout.extra_length else None
    return DecodedSum(
        weighted_sum=total[: layout.num_params],
        total_weight=int(total[layout.weight_index]),
        clipped_values=int(total[layout.clipped_index]),
        extra_sums=extra,
    )
