"""What a site is told for one run: its name, data and state folders, its privacy terms, and the per-site,
per-round numbers every engine derives the same way (seed, learning rate)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmed.config import TrainConfig
from fedmed.site.privacy import SitePrivacyTerms

StateDict = dict[str, torch.Tensor]

NUM_EXAMPLES = "num-examples"  # the metric that weighs a site's update or score (Flower's key)


@dataclass(frozen=True)
class SiteSpec:
    name: str
    data_path: Path
    state_dir: Path  # this site's private folder for this run (site-local parameters)
    threads: int | None = None  # torch CPU threads, when the site caps them
    run_id: str = ""
    privacy: SitePrivacyTerms | None = None  # None: no DP policy binds this site (e.g. a baseline)
    cache_dir: Path | None = None  # preprocessed cases kept across runs (scan geometry, data.cache = "disk")

    @property
    def preprocessed_dir(self) -> Path:
        return self.cache_dir or self.state_dir / "preprocessed"


def site_seed(base_seed: int, site_name: str, server_round: int) -> int:
    """A per-site, per-round seed that is the same in every engine and process."""
    return (base_seed * 1_000_003 + zlib.crc32(site_name.encode()) + server_round * 7_919) % (2**31 - 1)


def round_learning_rate(train: TrainConfig, *, server_round: int, rounds: int) -> float:
    """train.lr_schedule at this round: constant, or a cosine from the learning rate down to a tenth of it."""
    if train.lr_schedule == "constant" or rounds <= 1:
        return train.learning_rate
    progress = (server_round - 1) / (rounds - 1)
    return train.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))))


def round_train_config(train: TrainConfig, *, server_round: int) -> TrainConfig:
    """[train] with this round's learning rate (train.lr_schedule)."""
    learning_rate = round_learning_rate(train, server_round=server_round, rounds=train.rounds)
    return train.model_copy(update={"learning_rate": learning_rate})
