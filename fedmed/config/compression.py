"""[compression]: how a site shrinks its update (local - global) before it leaves, and the server decodes it.

Quantization to 16 or 8 bits (one float32 scale per `chunk` values, stochastic rounding) and top-k sparsification
(the largest `top_k` fraction of the values, by magnitude), with error feedback: what a round's encoding left out is
kept at the site and added to its next update (fedmed.compression, fedmed.site.compression).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig


class CompressionConfig(StrictModel):
    bits: Literal[32, 16, 8] = Field(
        32,
        description="bits per update value on the wire: 32 sends float32 (no quantization); 16 and 8 quantize "
        "linearly with one float32 scale per chunk; with secagg, 16 makes the masked vectors 16-bit, every site "
        "then weighing one in the mean",
    )
    top_k: float = Field(
        1.0,
        gt=0,
        le=1,
        description="fraction of the update's values sent, the largest by magnitude, each with its uint32 index; "
        "1.0 sends them all",
    )
    chunk: int = Field(
        2048,
        ge=16,
        description="values sharing one quantization scale (4 bytes each: 0.2 % of 8-bit data at 2048)",
    )
    stochastic_rounding: bool = Field(
        False,
        description="round each value up or down at random in proportion to its distance, so each decoded update is "
        "unbiased; off by default: error feedback already carries the rounding to the next round (PneumoniaMNIST, "
        "8-bit, seed 0: AUC 0.9535 rounding to nearest, 0.9479 stochastic, 0.9549 uncompressed)",
    )
    error_feedback: bool = Field(
        True,
        description="keep what the encoding left out at the site (on its disk, across rounds and restarts) and add "
        "it to the next round's update",
    )

    @property
    def enabled(self) -> bool:
        return self.bits < 32 or self.top_k < 1.0


def check_compression(run: RunConfig) -> None:
    """Under SecAgg+ the masked vectors carry the compression: 16 bits per value, never fewer, never sparse."""
    settings = run.compression
    if not (settings.enabled and run.secagg.enabled):
        return
    if settings.top_k < 1:
        raise ValueError(
            "compression.top_k < 1 cannot be combined with secagg: each site would send other positions, and masks "
            "cancel only where every site sends the same ones; use compression.bits = 16 (half the bytes) instead"
        )
    if settings.bits == 8:
        raise ValueError(
            "compression.bits = 8 cannot be combined with secagg: the masked sum of the sites' values must fit the "
            "field without wrapping, and 8 bits leave no room for it; use compression.bits = 16 (16-bit masked "
            "vectors, half the bytes of 32)"
        )
