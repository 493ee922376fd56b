"""How local training draws its batches: samples as tuples, a seeded shuffled loader, epochs or a step budget,
a logical batch in physical pieces, and batch-level random flips."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .base import Sample


class Columns(Dataset):
    """Samples as tuples in a fixed key order, read lazily (a patch dataset draws on every read)."""

    def __init__(self, samples: Sequence[Sample], keys: list[str]) -> None:
        self.samples = samples
        self.keys = keys

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        sample = self.samples[index]
        return tuple(sample[key] for key in self.keys)


def shuffled_loader(rows: Columns, *, batch_size: int, seed: int, workers: int) -> DataLoader:
    """Batches of at most `batch_size` rows (never more than there are), shuffled in an order fixed by `seed`."""
    return DataLoader(
        rows,
        batch_size=min(batch_size, len(rows)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        worker_init_fn=_seed_worker if workers else None,
    )


def draws(loader: DataLoader, *, epochs: int, steps: int | None) -> Iterator[tuple[int, int, tuple]]:
    """(epoch, batch index, batch) for `epochs` passes, or for exactly `steps` draws across passes."""
    if steps is None:
        for epoch in range(epochs):
            for batch_index, columns in enumerate(loader):
                yield epoch, batch_index, columns
        return
    drawn, epoch = 0, 0
    while drawn < steps:
        for batch_index, columns in enumerate(loader):
            if drawn == steps:
                return
            drawn += 1
            yield epoch, batch_index, columns
        epoch += 1


def split_batch(batch: dict[str, torch.Tensor], *, size: int) -> list[dict[str, torch.Tensor]]:
    """A logical batch in physical pieces of at most `size` samples, as even as possible (Opacus' split)."""
    total = len(next(iter(batch.values())))
    count = max(1, -(-total // size))
    pieces = [dict(zip(batch, values, strict=True)) for values in zip(*(v.tensor_split(count) for v in batch.values()))]
    return [piece for piece in pieces if len(next(iter(piece.values())))]


def random_flips(batch: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Flip each sample along each spatial axis with probability 1/2; labels shaped like the image follow."""
    image = batch["image"]
    flipped = dict(batch)
    for axis in range(2, image.dim()):
        chosen = torch.rand(image.shape[0], generator=generator, device=generator.device) < 0.5
        chosen = chosen.to(image.device).view(-1, *([1] * (image.dim() - 1)))
        for key, value in batch.items():
            if value.dim() == image.dim():
                flipped[key] = torch.where(chosen, flipped[key].flip(axis), flipped[key])
    return flipped


def _seed_worker(worker_id: int) -> None:
    # Each worker reseeds the dataset's MONAI transforms from its own torch seed, else every worker
    # would draw the same patches.
    from monai.data.utils import worker_init_fn  # MONAI is imported only when workers start (fedmed.data)

    worker_init_fn(worker_id)
