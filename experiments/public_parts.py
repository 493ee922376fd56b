"""A public part of a shared data set that no simulated site holds, for bench_dp_utility.py --public: the
coordinator pre-trains on it ([pretrain] public) and the sites fine-tune privately on the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from medmnist_sites import split_npz


def npz_with_public_third(source: Path, *, out: Path, names: list[str], seed: int) -> tuple[Path, dict[str, Path]]:
    """A third of the training images (and of the validation + test images) as public.npz, the rest split
    evenly over `names`; every part stratified by class."""
    parts = 3 * len(names)  # a third public: len(names) parts of 3 * len(names), each site 2 of them
    pieces = split_npz(source, out=out / "pieces", names=[f"part-{i}" for i in range(parts)], seed=seed)
    ordered = list(pieces.values())
    public = _merge(ordered[: len(names)], out=out / "public.npz")
    rest = ordered[len(names) :]
    sites = {name: _merge(rest[2 * index : 2 * index + 2], out=out / f"{name}.npz") for index, name in enumerate(names)}
    return public, sites


def _merge(paths: list[Path], *, out: Path) -> Path:
    arrays: dict[str, list[np.ndarray]] = {}
    for path in paths:
        with np.load(path) as archive:
            for key in archive.files:
                arrays.setdefault(key, []).append(archive[key])
    np.savez_compressed(out, **{key: np.concatenate(values) for key, values in arrays.items()})
    return out
