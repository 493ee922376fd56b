"""Error feedback at the site: what an encoding leaves out is added to the next round, across restarts; under
client-level DP the decoded update stays within the clipping norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.compression import UpdateCodec, decode_groups
from fedmed.site.compression import RESIDUAL_FILE, compress_update
from fedmed.site.local_layers import SiteStateFileError

CODEC = UpdateCodec(bits=8, top_k=0.1, chunk=64)


def _round(state_dir: Path, update: np.ndarray, *, seed: int, **options) -> tuple[np.ndarray, float | None]:
    """The decoded update a round sends, and the norm it had when client_dp's norm scaled it."""
    sent = {"float32": np.full(update.size, 2.0, dtype=np.float32)}
    trained = {"float32": sent["float32"] + update}
    encoded = compress_update(
        CODEC, trained=trained, sent=sent, state_dir=state_dir, seed=seed, error_feedback=True, **options
    )
    return decode_groups(CODEC, encoded.parts, sizes={"float32": update.size})["float32"], encoded.clipped_norm


def test_nothing_is_lost_only_delayed(tmp_path: Path) -> None:
    """Sum of what was sent + the residual kept = sum of the updates: the residual carries across rounds, and a new
    process (every call reads the site's disk afresh) picks it up."""
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(1000).astype(np.float32) * 0.01 for _ in range(5)]
    sent = [_round(tmp_path, update, seed=round_)[0] for round_, update in enumerate(updates)]
    residual = torch.load(tmp_path / RESIDUAL_FILE)["float32"].numpy()
    np.testing.assert_allclose(np.sum(sent, axis=0) + residual, np.sum(updates, axis=0), atol=2e-6)
    # A value top-k dropped in round 1 is sent later: far more of the update than 10 % got through.
    assert np.count_nonzero(np.sum(sent, axis=0)) > 300


def test_without_error_feedback_nothing_is_kept(tmp_path: Path) -> None:
    sent = {"float32": np.zeros(100, dtype=np.float32)}
    compress_update(
        CODEC,
        trained={"float32": np.ones(100, np.float32)},
        sent=sent,
        state_dir=tmp_path,
        seed=0,
        error_feedback=False,
    )
    assert not (tmp_path / RESIDUAL_FILE).exists()


def test_a_damaged_residual_file_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / RESIDUAL_FILE).write_bytes(b"half a file")
    with pytest.raises(SiteStateFileError, match=f"{RESIDUAL_FILE}.*move it aside"):
        _round(tmp_path, np.ones(10, dtype=np.float32), seed=0)


def test_the_decoded_update_stays_within_client_dps_clipping_norm(tmp_path: Path) -> None:
    """The residual and the rounding can lengthen what is sent; the coordinator's noise covers the norm and no more."""
    rng = np.random.default_rng(3)
    scaled = []
    for round_ in range(4):
        update = np.abs(rng.standard_normal(500)).astype(np.float32)  # one direction: the residual adds up
        update *= 1.0 / np.linalg.norm(update)  # clipped to 1 by Flower's mod before this one
        decoded, norm = _round(tmp_path, update, seed=round_, clipping_norm=1.0)
        assert np.linalg.norm(decoded.astype(np.float64)) <= 1.0
        scaled.append(norm)
    assert any(norm is not None and norm > 1.0 for norm in scaled)
