"""Small 2D segmentation samples for DP-SGD tests: a noisy bright square on a dark background, its mask the label."""

from __future__ import annotations

import torch


def squares(count: int) -> list[dict[str, torch.Tensor]]:
    """`count` 16x16 samples, the same for every call (seeded)."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(count):
        label = torch.zeros(1, 16, 16, dtype=torch.long)
        x, y = torch.randint(1, 9, (2,), generator=generator).tolist()
        label[0, x : x + 6, y : y + 6] = 1
        samples.append({"image": label.float() + 0.3 * torch.randn(1, 16, 16, generator=generator), "label": label})
    return samples
