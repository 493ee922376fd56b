"""A packed update's float groups (one flat vector per dtype, fedmed.flower.records.Layout) encoded part by part
under names "<group>.<part>" ("float32.values", "float32.scales", ...), and decoded back."""

from __future__ import annotations

import numpy as np

from .codec import CompressionError, UpdateCodec


def part_key(group: str, part: str) -> str:
    return f"{group}.{part}"


def encode_groups(
    codec: UpdateCodec, updates: dict[str, np.ndarray], *, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """Every group's encoded parts, by part key."""
    return {
        part_key(group, part): array
        for group, update in updates.items()
        for part, array in codec.encode(update, rng=rng).items()
    }


def group_parts(parts: dict[str, np.ndarray], group: str) -> dict[str, np.ndarray]:
    prefix = part_key(group, "")
    return {key.removeprefix(prefix): array for key, array in parts.items() if key.startswith(prefix)}


def decode_groups(codec: UpdateCodec, parts: dict[str, np.ndarray], *, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Each group's float32 update from its parts; `sizes`: the values each group holds."""
    unknown = sorted(key for key in parts if key.split(".", 1)[0] not in sizes)
    if unknown:
        raise CompressionError(f"the encoded update holds parts of groups this model lacks: {unknown[:3]}")
    return {group: codec.decode(group_parts(parts, group), size=size) for group, size in sizes.items()}
