"""The vector one site contributes, and how the server decodes the unmasked sum.

Elements of the field Z_(2^b), b = 32 (uint32) or 16 (uint16). Layout (length num_params + 2 + extra_length):
    [0, P)        w * q      the site's quantised update times its weight (W * L <= 2^b - 1)
    P             w          its weight, so the server learns only the total W = sum w
    P + 1         clipped    how many update values were clipped (capped at (2^b - 1) / sites, so the sum
                             cannot wrap), so only the total is learnt
    P + 2 ...     extra      optional small signed integers (e.g. DP norm-bit counts), two's complement
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmed.secagg.errors import SecAggInputError
from fedmed.secagg.quantize import field_dtype, quantize


@dataclass(frozen=True)
class VectorLayout:
    num_params: int
    extra_length: int = 0
    field_bits: int = 32

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return field_dtype(self.field_bits)

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
    weighted_sum: np.ndarray  # the field's dtype, sum_i w_i q_i
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
    """The unmasked vector of one site (in the layout's field) and the number of values clipped."""
    if isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or not 1 <= weight <= max_total_weight:
        raise SecAggInputError(
            f"site weight {weight!r} must be an integer in [1, max_total_weight={max_total_weight}]: "
            "larger weights could wrap the field's sum; raise SecAggSettings.max_total_weight on the "
            "coordinator to at least the total number of training examples of a round"
        )
    weight = int(weight)
    vector = np.empty(layout.length, dtype=layout.dtype)
    levels_vec, clipped = quantize(flat_update, clipping_range=clipping_range, levels=levels)
    # w * q <= max_total_weight * L <= 2^b - 1: exact in the field.
    np.multiply(levels_vec, weight, out=vector[: layout.num_params], casting="unsafe")
    vector[layout.weight_index] = weight
    vector[layout.clipped_index] = min(clipped, (2**layout.field_bits - 1) // num_sites)
    vector[layout.extra_start :] = _encode_extra(extra_counts, layout=layout, num_sites=num_sites)
    return vector, clipped


def _encode_extra(extra_counts: Sequence[int] | None, *, layout: VectorLayout, num_sites: int) -> np.ndarray:
    if extra_counts is None:
        if layout.extra_length:
            raise SecAggInputError(
                f"this round also sums {layout.extra_length} extra counts per site; pass extra_counts "
                f"with {layout.extra_length} integers to mask()"
            )
        return np.zeros(0, dtype=layout.dtype)
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
    # The sum of num_sites values must stay inside the field's signed range so its two's complement decodes exactly.
    limit = 2 ** (layout.field_bits - 1) // num_sites
    if counts.size and int(np.abs(counts).max()) >= limit:
        raise SecAggInputError(
            f"extra count {int(np.abs(counts).max())} is too large: with {num_sites} sites each must "
            f"satisfy |count| < {limit}; extra counts are for small integers such as DP norm bits"
        )
    return (counts % 2**layout.field_bits).astype(layout.dtype)


def decode_sum(total: np.ndarray, *, layout: VectorLayout) -> DecodedSum:
    signed = np.int32 if layout.field_bits == 32 else np.int16
    extra = total[layout.extra_start :].view(signed).astype(np.int64) if layout.extra_length else None
    return DecodedSum(
        weighted_sum=total[: layout.num_params],
        total_weight=int(total[layout.weight_index]),
        clipped_values=int(total[layout.clipped_index]),
        extra_sums=extra,
    )
