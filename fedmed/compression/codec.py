"""Lossy codes for one flat float update: linear quantization to 16 or 8 bits with a scale per chunk, and top-k.

An encoded update is a few named arrays (`values`, and `scales` and `indices` where they apply), so it travels as
ordinary arrays of a Flower ArrayRecord. The decoder trusts nothing about them: a site's reply is input from outside
the coordinator, so every length, dtype and index is checked before it is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedmed.config import CompressionConfig
from fedmed.core.errors import FedmedError

VALUES = "values"
SCALES = "scales"
INDICES = "indices"
_INTEGERS = {16: np.int16, 8: np.int8}


class CompressionError(FedmedError):
    """An encoded update that does not decode to the model it claims to update."""


@dataclass(frozen=True)
class UpdateCodec:
    """bits: 32 (float32 values), 16 or 8 (integers in [-L, L], L = 2^(bits-1) - 1, times their chunk's scale);
    top_k: the fraction of values kept, the largest by magnitude; chunk: values per scale; stochastic: round up
    or down at random in proportion to the distance (unbiased), else to nearest."""

    bits: int = 32
    top_k: float = 1.0
    chunk: int = 2048
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (32, *_INTEGERS):
            raise CompressionError(f"compression.bits must be 32, 16 or 8, got {self.bits}")
        if not 0 < self.top_k <= 1:
            raise CompressionError(f"compression.top_k must lie in (0, 1], got {self.top_k}")
        if self.chunk < 1:
            raise CompressionError(f"compression.chunk must be at least 1, got {self.chunk}")

    @property
    def levels(self) -> int:
        """L: the largest integer a quantized value can take."""
        return 2 ** (self.bits - 1) - 1

    def kept(self, size: int) -> int:
        """How many of `size` values top-k sends: at least one of a non-empty update."""
        if self.top_k >= 1:
            return size
        return min(size, max(1, math.ceil(self.top_k * size)))

    def encode(self, update: np.ndarray, *, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """The encoded arrays of a flat update; `rng` draws the stochastic rounding (needed when it is on)."""
        values = np.ascontiguousarray(update, dtype=np.float32).reshape(-1)
        if not np.isfinite(values).all():
            raise CompressionError(
                f"the update holds {int(np.count_nonzero(~np.isfinite(values)))} NaN or infinite values and cannot be "
                "encoded; the site's training diverged (lower train.learning_rate)"
            )
        parts: dict[str, np.ndarray] = {}
        kept = self.kept(values.size)
        if kept < values.size:
            indices = np.sort(np.argpartition(np.abs(values), values.size - kept)[values.size - kept :])
            parts[INDICES] = indices.astype(np.uint32)
            values = values[indices]
        if self.bits == 32:
            parts[VALUES] = values.copy()
            return parts
        if self.stochastic and rng is None:
            raise CompressionError("stochastic rounding needs a random generator: pass rng")
        parts[VALUES], parts[SCALES] = _quantize(
            values,
            levels=self.levels,
            chunk=self.chunk,
            dtype=_INTEGERS[self.bits],
            rng=rng if self.stochastic else None,
        )
        return parts

    def decode(self, parts: dict[str, np.ndarray], *, size: int) -> np.ndarray:
        """The float32 update of `size` values that `parts` encode; CompressionError says what does not fit."""
        kept = self.kept(size)
        expected = {VALUES} | ({SCALES} if self.bits < 32 else set()) | ({INDICES} if kept < size else set())
        if set(parts) != expected:
            raise CompressionError(
                f"the encoded update holds {sorted(parts)}, this run's compression sends {sorted(expected)}; the site "
                "runs another [compression] setting"
            )
        values = np.asarray(parts[VALUES]).reshape(-1)
        dtype = np.float32 if self.bits == 32 else _INTEGERS[self.bits]
        if values.dtype != dtype or values.size != kept:
            raise CompressionError(
                f"the encoded update has {values.size} values of {values.dtype}, this run expects {kept} of "
                f"{np.dtype(dtype).name}"
            )
        if self.bits == 32:
            decoded = values.astype(np.float32)
        else:
            decoded = _dequantize(values, np.asarray(parts[SCALES]).reshape(-1), levels=self.levels, chunk=self.chunk)
        if not np.isfinite(decoded).all():
            raise CompressionError("the encoded update decodes to NaN or infinite values")
        if kept == size:
            return decoded
        indices = np.asarray(parts[INDICES]).reshape(-1)
        if indices.dtype != np.uint32 or indices.size != kept:
            raise CompressionError(
                f"the encoded update has {indices.size} indices of {indices.dtype}, expected {kept} uint32"
            )
        if kept and (int(indices[-1]) >= size or np.any(np.diff(indices.astype(np.int64)) <= 0)):
            raise CompressionError(f"the encoded update's indices are not distinct, ascending and below {size}")
        full = np.zeros(size, dtype=np.float32)
        full[indices] = decoded
        return full

    def scaled(self, parts: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
        """The encoding of the update times `factor`: quantized values are integers, so their scales change."""
        key = VALUES if self.bits == 32 else SCALES
        return {**parts, key: (parts[key] * np.float32(factor)).astype(np.float32)}

    @classmethod
    def of(cls, config: CompressionConfig) -> UpdateCodec:
        return cls(bits=config.bits, top_k=config.top_k, chunk=config.chunk, stochastic=config.stochastic_rounding)


def _quantize(
    values: np.ndarray, *, levels: int, chunk: int, dtype: type[np.integer], rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Integers in [-L, L] and one float32 scale per chunk (its largest magnitude / L).

    In place on one padded copy: for a 50 M-parameter update every fresh 200 MB array costs more in page faults
    than the arithmetic on it."""
    count = values.size
    padded = np.zeros(math.ceil(count / chunk) * chunk, dtype=np.float32)
    padded[:count] = values
    rows = padded.reshape(-1, chunk)
    scales = (np.maximum(rows.max(axis=1), -rows.min(axis=1)) / np.float32(levels)).astype(np.float32)
    np.divide(rows, np.where(scales > 0, scales, np.float32(1))[:, None], out=rows)
    if rng is None:
        np.rint(rows, out=rows)
    else:
        rows += rng.random(rows.shape, dtype=np.float32)
        np.floor(rows, out=rows)
    np.clip(rows, -levels, levels, out=rows)  # float32 division can land a hair past L
    return padded[:count].astype(dtype), scales


def _dequantize(values: np.ndarray, scales: np.ndarray, *, levels: int, chunk: int) -> np.ndarray:
    chunks = math.ceil(values.size / chunk)
    if scales.dtype != np.float32 or scales.size != chunks:
        raise CompressionError(
            f"the encoded update has {scales.size} scales of {scales.dtype}, expected {chunks} float32"
        )
    if not np.isfinite(scales).all() or np.any(scales < 0):
        raise CompressionError("the encoded update's scales are negative, NaN or infinite")
    if values.size and (int(values.min()) < -levels or int(values.max()) > levels):
        raise CompressionError(f"the encoded update's values lie outside [-{levels}, {levels}]")
    decoded = values.astype(np.float32)
    whole = values.size // chunk * chunk
    full_chunks = decoded[:whole].reshape(-1, chunk)  # a view: scaled in place
    full_chunks *= scales[: whole // chunk, None]
    if whole < values.size:
        decoded[whole:] *= scales[-1]
    return decoded
