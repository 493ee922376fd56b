"""The round's site updates (local - global over the floating-point arrays, flat, in the order the round sent them),
read a slice of coordinates at a time.

The coordinator must not hold every site's update at once: a 54 M-parameter model is 217 MB per update, so twenty
sites' updates held as float64 for the arithmetic would be 8.7 GB, and the median's stacked copy as much again.
`SpilledUpdates` writes each update to a file as its reply arrives and the reply's arrays are let go; the robust
layer then reads a slice of coordinates of every kept site at a time (norms, the median centre, Krum's distances, the
weighted sum). Files are read with plain reads, not memory maps: mapped pages count towards the process's
resident memory once touched. `HeldUpdates` is the same interface over arrays already in memory (tests, small runs).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord

from fedmed.core.errors import FedmedError

# Values per slice, over all the sites read together (16 MiB as float64): a slice holds fewer coordinates the more
# sites there are, so the memory it takes does not grow with them.
SLICE_VALUES = 1 << 21
STORED = np.float32
PREFIX = ".round-updates-"  # the round's folder in the run directory


class UpdateStoreError(FedmedError):
    """A site's update could not be written to or read from the coordinator's disk."""


class Updates(Protocol):
    """Flat update vectors by site, readable a slice at a time."""

    size: int
    norms: dict[str, float]
    counters: dict[str, dict[str, Array]]  # by site: the arrays that are not floating point, as received

    def row(self, site: str) -> np.ndarray:
        """`site`'s whole update."""
        ...

    def slices(self, sites: list[str]) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, block): block[i] holds sites[i]'s coordinates offset .. offset + block.shape[1], as float64."""
        ...


def floating_keys(sent: Mapping[str, np.ndarray]) -> list[str]:
    """The arrays an update is measured over: counters (BatchNorm's num_batches_tracked) are not a direction."""
    return [key for key, array in sent.items() if np.issubdtype(array.dtype, np.floating)]


class HeldUpdates:
    """Updates already in memory."""

    def __init__(
        self, updates: Mapping[str, np.ndarray], *, counters: Mapping[str, dict[str, Array]] | None = None
    ) -> None:
        self.counters = {site: dict((counters or {}).get(site, {})) for site in updates}
        self._updates = {site: np.asarray(update, dtype=np.float64).ravel() for site, update in updates.items()}
        sizes = {update.size for update in self._updates.values()}
        if len(sizes) > 1:
            raise UpdateStoreError(f"the updates differ in length ({sorted(sizes)}); every site must run one model")
        self.size = sizes.pop() if sizes else 0
        self.norms = {site: float(np.linalg.norm(update)) for site, update in self._updates.items()}

    def row(self, site: str) -> np.ndarray:
        return self._updates[site]

    def slices(self, sites: list[str]) -> Iterator[tuple[int, np.ndarray]]:
        width = _width(sites)
        for offset in range(0, self.size, width):
            yield offset, np.stack([self._updates[site][offset : offset + width] for site in sites])


class SpilledUpdates:
    """Updates in files under `folder` (a temporary folder removed on `close`), one per site, as float32."""

    def __init__(self, sent: Mapping[str, np.ndarray], *, folder: Path | None = None) -> None:
        self._sent = sent
        self._keys = floating_keys(sent)
        self.size = sum(sent[key].size for key in self._keys)
        self.norms: dict[str, float] = {}
        self.counters: dict[str, dict[str, Array]] = {}
        self._files: dict[str, Path] = {}
        try:
            self._folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=folder))
        except OSError as error:
            raise UpdateStoreError(
                f"cannot create a folder for the round's updates in {folder}: {error}. The coordinator writes each "
                "site's update there while the round is aggregated; make the run directory writable"
            ) from error

    @staticmethod
    def remove_stale(folder: Path) -> None:
        """Remove what a coordinator killed mid-round left in `folder`: that round runs again from its start."""
        for stale in folder.glob(f"{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def __enter__(self) -> SpilledUpdates:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self._folder, ignore_errors=True)

    def add(self, site: str, received: ArrayRecord) -> None:
        """Write `site`'s update (its arrays minus the round's), one array at a time. The file is numbered, not named
        after the site: the name is what the reply says, and a reply is input from outside."""
        path = self._files.setdefault(site, self._folder / f"{len(self._files)}.f32")
        squared = 0.0
        try:
            with path.open("wb") as file:
                for key in self._keys:
                    start = self._sent[key]
                    update = (received[key].numpy().astype(np.float64) - start).astype(STORED).ravel()
                    squared += float(np.einsum("i,i->", update, update, dtype=np.float64))
                    update.tofile(file)
        except OSError as error:
            if path.is_file():
                path.unlink()  # a partial update must not be read as a whole one
            megabytes = self.size * np.dtype(STORED).itemsize / 1e6
            raise UpdateStoreError(
                f"writing site {site}'s update to {path} failed: {error}. Each site's update needs {megabytes:.0f} MB "
                f"there until the round is aggregated; free disk space in {self._folder.parent}"
            ) from error
        self.norms[site] = float(np.sqrt(squared))
        self.counters[site] = {key: received[key] for key in self._sent if key not in self._keys}

    def row(self, site: str) -> np.ndarray:
        return reduced(self, [site], lambda block: block[0])

    def slices(self, sites: list[str]) -> Iterator[tuple[int, np.ndarray]]:
        files = [self._files[site].open("rb") for site in sites]
        width = _width(sites)
        try:
            for offset in range(0, self.size, width):
                count = min(width, self.size - offset)
                block = np.empty((len(sites), count), dtype=np.float64)
                for row, file in enumerate(files):
                    values = np.fromfile(file, dtype=STORED, count=count)
                    if values.size != count:
                        raise UpdateStoreError(f"{file.name} ends early: the round's update files were changed")
                    block[row] = values
                yield offset, block
        finally:
            for file in files:
                file.close()


def _width(sites: list[str]) -> int:
    """Coordinates per slice."""
    return max(1, SLICE_VALUES // max(1, len(sites)))


def reduced(updates: Updates, sites: list[str], reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """One vector from the sites' updates, `reduce` applied per slice along the sites' axis (float32: the size of
    one update, never of all)."""
    result = np.empty(updates.size, dtype=STORED)
    for offset, block in updates.slices(sites):
        result[offset : offset + block.shape[1]] = reduce(block)
    return result


def weighted_sum(updates: Updates, factors: dict[str, float]) -> np.ndarray:
    """sum_i factors[i] * update_i, summed in float64 slice by slice."""
    sites = sorted(factors)
    weights = np.asarray([factors[site] for site in sites], dtype=np.float64)
    return reduced(updates, sites, lambda block: weights @ block)


def squared_distances(updates: Updates, sites: list[str]) -> np.ndarray:
    """The sites' pairwise squared L2 distances."""
    distances = np.zeros((len(sites), len(sites)))
    for _, block in updates.slices(sites):
        products = block @ block.T
        diagonal = np.diag(products)
        distances += diagonal[:, None] + diagonal[None, :] - 2 * products
    return np.maximum(distances, 0.0)
