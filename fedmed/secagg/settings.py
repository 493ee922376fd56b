"""SecAggSettings: the knobs of one secure-aggregation round, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmed.secagg.errors import SecAggInputError
from fedmed.secagg.quantize import FIELD_BITS, max_quantization_error, quantization_levels


@dataclass(frozen=True)
class SecAggSettings:
    """Settings the coordinator chooses; the clients receive the relevant ones in the setup message.

    clipping_range: R; every update value is clipped to [-R, R] before quantisation (clipped values
        are counted and reported in SecAggResult.clipped_values, never silently dropped).
    max_total_weight: the largest total weight (training examples summed over all sites) one round
        may carry; it fixes the number of quantisation levels so the uint32 sum cannot wrap.
    reconstruction_threshold: shares needed to rebuild a secret; None -> majority of the
        neighbourhood, max(2, k // 2 + 1). A majority keeps a server that lies about who dropped
        from collecting both secrets of one site (two majorities always share an honest member).
    num_shares: neighbourhood size k (including the site itself) when there are more than 10 sites;
        None -> the smallest odd k >= max(11, 2 * ceil(log2 n) + 1). With <= 10 sites, or
        k >= n, every site is every other's neighbour (plain SecAgg).
    stage_timeout_s: how long the transport waits for the replies of one stage.
    field_bits: every vector element lives in Z_(2^field_bits): 32 (uint32 on the wire) or 16 (uint16, half
        the bytes; with max_total_weight * L <= 2^16 - 1 the levels are far fewer).
    """

    clipping_range: float = 0.5
    max_total_weight: int = 2**16
    reconstruction_threshold: int | None = None
    num_shares: int | None = None
    stage_timeout_s: float = 120.0
    field_bits: int = 32

    def __post_init__(self) -> None:
        if (
            isinstance(self.clipping_range, bool)
            or not isinstance(self.clipping_range, (int, float))
            or not math.isfinite(self.clipping_range)
            or self.clipping_range <= 0
        ):
            raise SecAggInputError(
                f"clipping_range must be a finite number > 0, got {self.clipping_range!r}; "
                "set it to the largest expected |update| value, e.g. 0.5"
            )
        if not _is_int(self.max_total_weight) or self.max_total_weight < 1:
            raise SecAggInputError(
                f"max_total_weight must be an integer >= 1, got {self.max_total_weight!r}; set it to an "
                "upper bound on the training examples summed over all sites in one round, e.g. 65536"
            )
        if self.field_bits not in FIELD_BITS:
            raise SecAggInputError(f"field_bits must be one of {FIELD_BITS}, got {self.field_bits!r}")
        quantization_levels(self.max_total_weight, field_bits=self.field_bits)  # raises when too few levels remain
        if self.reconstruction_threshold is not None and (
            not _is_int(self.reconstruction_threshold) or self.reconstruction_threshold < 2
        ):
            raise SecAggInputError(
                f"reconstruction_threshold must be None (majority) or an integer >= 2, got "
                f"{self.reconstruction_threshold!r}; a threshold of 1 would let any single site reveal secrets"
            )
        if self.num_shares is not None and (
            not _is_int(self.num_shares) or self.num_shares < 3 or self.num_shares % 2 == 0
        ):
            raise SecAggInputError(
                f"num_shares must be None (automatic) or an odd integer >= 3, got {self.num_shares!r}; "
                "the ring neighbourhood is symmetric (k // 2 sites on each side plus the site itself)"
            )
        if (
            isinstance(self.stage_timeout_s, bool)
            or not isinstance(self.stage_timeout_s, (int, float))
            or not math.isfinite(self.stage_timeout_s)
            or self.stage_timeout_s <= 0
        ):
            raise SecAggInputError(
                f"stage_timeout_s must be a finite number of seconds > 0, got {self.stage_timeout_s!r}"
            )

    @property
    def levels(self) -> int:
        """L, the number of quantisation steps across [-R, R]."""
        return quantization_levels(self.max_total_weight, field_bits=self.field_bits)

    @property
    def max_quantization_error(self) -> float:
        """Per-element bound on |secure mean - exact weighted mean of the clipped updates|."""
        return max_quantization_error(clipping_range=float(self.clipping_range), levels=self.levels)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
