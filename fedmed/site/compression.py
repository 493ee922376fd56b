"""[compression] at the site: its update (local - global) encoded before it leaves, with error feedback.

What a round's encoding leaves out (rounding, the values top-k drops) is the residual: kept on the site's disk and
added to the next round's update, so nothing the site learnt is lost, only delayed. On disk, not in memory: Flower
starts a fresh ClientApp process per message in deployment, and a daemon restart must not drop it either.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedmed.compression import UpdateCodec, decode_groups, encode_groups, group_parts, part_key
from fedmed.core.files import atomic_path
from fedmed.core.log import logger
from fedmed.site.local_layers import LocalParameterStore

RESIDUAL_FILE = "compression_residual.pt"


@dataclass(frozen=True)
class CompressedUpdate:
    parts: dict[str, np.ndarray]  # by part key ("float32.values", ...): what the site sends
    seconds: float  # encoding (with the residual's load and save)
    clipped_norm: float | None  # the decoded update's norm when client-level DP's norm scaled it down


class ErrorFeedback:
    """The residual one site keeps for one run, in its state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.store = LocalParameterStore(state_dir, file_name=RESIDUAL_FILE)

    def add_to(self, updates: dict[str, np.ndarray]) -> None:
        """Add the kept residual to the float32 updates, in place."""
        kept = self.store.load()
        if kept is None:
            return
        if {group: tuple(value.shape) for group, value in kept.items()} != {g: u.shape for g, u in updates.items()}:
            logger.warning("%s does not fit this run's model; error feedback starts afresh", self.store.path)
            return
        for group, value in kept.items():
            updates[group] += value.numpy()

    def keep(self, updates: dict[str, np.ndarray], *, sent: dict[str, np.ndarray]) -> None:
        """Keep updates - sent (what actually left) as the next residual; `updates` becomes it, in place."""
        for group, update in updates.items():
            update -= sent[group]
        with atomic_path(self.store.path) as temporary:  # not store.save, which copies every tensor first
            torch.save({group: torch.from_numpy(update) for group, update in updates.items()}, temporary)


def compress_update(
    codec: UpdateCodec,
    *,
    trained: dict[str, np.ndarray],
    sent: dict[str, np.ndarray],
    state_dir: Path,
    seed: int,
    error_feedback: bool,
    clipping_norm: float | None = None,
) -> CompressedUpdate:
    """Encode the update of each float group (trained - sent, plus the kept residual) and keep the new residual.
    `trained`'s float32 arrays are overwritten.

    clipping_norm: client-level DP's; the decoded update is scaled to at most that long, since the coordinator's
    noise covers an update of that norm and no more, whatever the residual and the rounding add."""
    started = time.perf_counter()
    feedback = ErrorFeedback(state_dir) if error_feedback else None
    # In place where the trained arrays allow: a 50 M-parameter update is 200 MB a copy.
    updates = {group: np.asarray(trained[group], dtype=np.float32) for group in sent}
    for group, update in updates.items():
        update -= sent[group]
    if feedback is not None:
        feedback.add_to(updates)
    parts = encode_groups(codec, updates, rng=np.random.default_rng(seed))
    sizes = {group: update.size for group, update in updates.items()}
    decoded = decode_groups(codec, parts, sizes=sizes)
    clipped_norm = None
    if clipping_norm is not None:
        norm = math.sqrt(sum(float(np.dot(d.astype(np.float64), d.astype(np.float64))) for d in decoded.values()))
        if norm > clipping_norm:
            factor = clipping_norm / norm * (1 - 2.0**-20)  # under 1 by more than float32's rounding of the product
            parts = _scaled_groups(codec, parts, factor, groups=sizes)
            decoded = decode_groups(codec, parts, sizes=sizes)
            clipped_norm = norm
    if feedback is not None:
        feedback.keep(updates, sent=decoded)
    return CompressedUpdate(parts=parts, seconds=time.perf_counter() - started, clipped_norm=clipped_norm)


def _scaled_groups(
    codec: UpdateCodec, parts: dict[str, np.ndarray], factor: float, *, groups: dict[str, int]
) -> dict[str, np.ndarray]:
    scaled: dict[str, np.ndarray] = {}
    for group in groups:
        for part, array in codec.scaled(group_parts(parts, group), factor).items():
            scaled[part_key(group, part)] = array
    return scaled
