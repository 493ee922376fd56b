"""MedMNIST .npz files dealt out to simulated sites, for the benchmarks (bench_pretrained_init, bench_dp_utility)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def split_npz(
    source: Path, *, out: Path, names: list[str] | tuple[str, ...], seed: int, train_per_site: int | None = None
) -> dict[str, Path]:
    """One .npz site per name: the training images split by class into equal parts, the validation + test images
    likewise for evaluation; with `train_per_site`, each site keeps that many of its training images (a random,
    class-stratified subset)."""
    out.mkdir(parents=True, exist_ok=True)
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    rng = np.random.default_rng(seed)
    train = _stratified_parts(arrays["train_images"], arrays["train_labels"].reshape(-1), len(names), rng)
    if train_per_site is not None:
        train = [_subset(images, labels, size=train_per_site, rng=rng) for images, labels in train]
    evaluation = _stratified_parts(
        np.concatenate([arrays["val_images"], arrays["test_images"]]),
        np.concatenate([arrays["val_labels"].reshape(-1), arrays["test_labels"].reshape(-1)]),
        len(names),
        rng,
    )
    paths = {}
    for index, name in enumerate(names):
        paths[name] = out / f"{name}.npz"
        np.savez_compressed(
            paths[name],
            train_images=train[index][0],
            train_labels=train[index][1],
            val_images=evaluation[index][0],
            val_labels=evaluation[index][1],
        )
    return paths


def _stratified_parts(
    images: np.ndarray, labels: np.ndarray, parts: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    members: list[list[int]] = [[] for _ in range(parts)]
    for value in np.unique(labels):
        chosen = rng.permutation(np.flatnonzero(labels == value))
        for index, part in enumerate(np.array_split(chosen, parts)):
            members[index] += part.tolist()
    return [(images[sorted(part)], labels[sorted(part)]) for part in members]


def _subset(
    images: np.ndarray, labels: np.ndarray, *, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    keep: list[int] = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        share = max(1, round(size * len(members) / len(labels)))
        keep += rng.choice(members, size=min(share, len(members)), replace=False).tolist()
    return images[sorted(keep)], labels[sorted(keep)]
