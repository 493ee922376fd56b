"""Fixed-point quantisation of clipped update values onto L integer levels, and its error bound; the field.

A value x is clipped to [-R, R] and mapped to q = rint((x + R) * L / (2R)), an integer in [0, L];
it decodes as q * (2R / L) - R. Round-to-nearest (not Flower's stochastic rounding) gives the
tighter worst-case bound (half a step instead of a whole step) and makes rounds reproducible.
L is even so that 0 maps exactly to L/2: frozen parameters (zero update) stay exactly zero.
"""

from __future__ import annotations

import numpy as np

from fedmed.secagg.errors import SecAggInputError

FIELD_BITS = (32, 16)  # the field Z_(2^b) of every vector on the wire; arithmetic wraps modulo 2^b
MODULUS = 2**32  # the default field's


def field_dtype(field_bits: int) -> type[np.unsignedinteger]:
    """The unsigned integer type whose arithmetic is the field's: numpy wraps it modulo 2^field_bits."""
    if field_bits not in FIELD_BITS:
        raise SecAggInputError(f"field_bits must be one of {FIELD_BITS}, got {field_bits!r}")
    return np.uint32 if field_bits == 32 else np.uint16


def quantization_levels(max_total_weight: int, *, field_bits: int = 32) -> int:
    """L: the largest even integer with max_total_weight * L <= 2^field_bits - 1.

    The server sums w_i * q_i with q_i <= L and sum_i w_i <= max_total_weight, so this L is the
    finest grid for which the weighted integer sum cannot wrap modulo 2^field_bits.
    """
    largest = 2**field_bits - 1
    levels = largest // max_total_weight
    levels -= levels % 2
    if levels < 2:
        raise SecAggInputError(
            f"max_total_weight={max_total_weight} leaves fewer than 2 quantisation levels in a {field_bits}-bit "
            f"sum; set max_total_weight to at most {largest // 2}"
        )
    return levels


def max_quantization_error(*, clipping_range: float, levels: int) -> float:
    """Worst-case |secure mean - exact weighted mean of the clipped updates|, per element.

    Each site's rounding error is at most half a step, R / L, so any weighted mean of them is too.
    The result is then computed in float64 and stored as float32, which adds at most
    |mean| * 2^-24 <= R * 2^-24; R * 2^-23 covers that plus float64 arithmetic with room to spare.
    """
    return clipping_range / levels + clipping_range * 2.0**-23


def quantize(values: np.ndarray, *, clipping_range: float, levels: int) -> tuple[np.ndarray, int]:
    """Levels in [0, L] (uint32) for a flat float array, and how many values had to be clipped."""
    as_float = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(as_float)):
        bad = int(np.count_nonzero(~np.isfinite(as_float)))
        raise SecAggInputError(
            f"the update contains {bad} NaN or infinite values; secure aggregation cannot encode them "
            "(fix the local training divergence, e.g. lower the learning rate, before aggregating)"
        )
    clipped = int(np.count_nonzero(np.abs(as_float) > clipping_range))
    scaled = np.clip(as_float, -clipping_range, clipping_range)
    scaled += clipping_range
    scaled *= levels / (2.0 * clipping_range)
    np.rint(scaled, out=scaled)
    # Float noise cannot push an endpoint past [0, L], but clamp anyway: a wrapped level is a wrong sum.
    np.clip(scaled, 0, levels, out=scaled)
    return scaled.astype(np.uint32), clipped


def dequantize(levels_vec: np.ndarray, *, clipping_range: float, levels: int) -> np.ndarray:
    """float32 values of one site's levels: what it contributes to the mean (its clipped, rounded update)."""
    values = levels_vec.astype(np.float64) * (2.0 * clipping_range / levels)
    values -= clipping_range
    return values.astype(np.float32)


def dequantize_mean(weighted_sum: np.ndarray, *, total_weight: int, clipping_range: float, levels: int) -> np.ndarray:
    """float32 weighted mean from sum_i w_i q_i and W = sum_i w_i: (S / W) * (2R / L) - R."""
    if total_weight < 1:
        raise SecAggInputError(f"total weight must be at least 1 to form a mean, got {total_weight}")
    step = 2.0 * clipping_range / levels
    mean = weighted_sum.astype(np.float64)
    mean *= step / total_weight
    mean -= clipping_range
    return mean.astype(np.float32)
