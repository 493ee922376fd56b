"""robust.update_norm_bound under SecAgg+: the site's own bounding of its update, and the coordinator's check of
the unmasked mean (its tolerance derived from the real quantizer)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedmed.flower.client.secagg import bound_update_inplace
from fedmed.flower.server.secure_round import aggregate_norm_tolerance, check_aggregate_norm
from fedmed.secagg.encoding import l2_norm
from fedmed.secagg.quantize import dequantize_mean, max_quantization_error, quantization_levels, quantize


def test_a_site_scales_an_update_over_the_bound_down_to_it_and_leaves_a_shorter_one_alone() -> None:
    rng = np.random.default_rng(0)
    update = [rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=7).astype(np.float32)]
    before = [array.copy() for array in update]
    measured = bound_update_inplace(update, bound=0.25)
    assert measured == pytest.approx(l2_norm(before), rel=1e-12) and measured > 0.25
    # One float32 rounding per value: at most 2^-24 of the bound over it.
    assert l2_norm(update) == pytest.approx(0.25, rel=2**-23) and l2_norm(update) <= 0.25 * (1 + 2**-24)
    for scaled, original in zip(update, before, strict=True):
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled, original * (0.25 / measured), rtol=2**-23)

    short = [array.copy() for array in update]
    assert bound_update_inplace(short, bound=1.0) is None
    assert all(np.array_equal(a, b) for a, b in zip(short, update, strict=True)), "an update under the bound is kept"

    broken = [np.array([np.nan, 1.0], dtype=np.float32)]
    assert bound_update_inplace(broken, bound=0.1) is None, "the encoder refuses a NaN update with its reason"


def test_a_mean_over_the_bound_is_rejected_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedmed")
    mean = [np.full(12, 0.1, dtype=np.float32), np.full((2, 2), 0.1, dtype=np.float32)]  # norm 0.4
    record = check_aggregate_norm(mean, bound=0.2, max_quantization_error=1e-6, server_round=3)
    assert record["aggregate_update_norm"] == pytest.approx(0.4, rel=1e-6)
    assert record["update_norm_bound"] == 0.2
    assert "over robust.update_norm_bound 0.2" in record["aggregate_rejected"]
    assert "cannot say which site" in record["aggregate_rejected"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(message.startswith("round 3: the unmasked mean update has norm 0.4") for message in warnings)

    caplog.clear()
    kept = check_aggregate_norm(mean, bound=0.4, max_quantization_error=1e-6, server_round=3)
    assert "aggregate_rejected" not in kept and kept["aggregate_update_norm"] == pytest.approx(0.4, rel=1e-6)
    assert not caplog.records, "an aggregate within the bound is not warned about"

    tolerance = aggregate_norm_tolerance(bound=0.39, max_quantization_error=1e-3, num_params=16)
    assert tolerance == pytest.approx(4e-3 + 0.39 * 2**-22)
    assert "aggregate_rejected" not in check_aggregate_norm(
        mean, bound=0.3965, max_quantization_error=1e-3, server_round=1
    ), "within the quantization tolerance"
    assert "aggregate_rejected" in check_aggregate_norm(mean, bound=0.395, max_quantization_error=1e-3, server_round=1)

    nan = [np.array([np.nan, 0.0], dtype=np.float32)]
    assert "aggregate_rejected" in check_aggregate_norm(nan, bound=1.0, max_quantization_error=1e-6, server_round=1)


def test_the_tolerance_covers_the_worst_quantization_of_updates_at_the_bound() -> None:
    """Every site sends the same update, exactly at the bound, with each value just past a midpoint of the
    quantization grid so that rounding moves it outward by almost half a step: the worst honest case."""
    clipping_range, max_total_weight = 0.5, 2**20
    levels = quantization_levels(max_total_weight)
    step = 2 * clipping_range / levels
    size = 400
    magnitude = 37 * step + 0.5001 * step  # rounds up to 38 steps: 0.4999 step outward
    signs = np.where(np.arange(size) % 2 == 0, 1.0, -1.0)
    update = (signs * magnitude).astype(np.float64)
    bound = l2_norm([update])
    weights = [1, 2, 3]
    levels_vector, clipped = quantize(update, clipping_range=clipping_range, levels=levels)
    assert clipped == 0
    weighted_sum = sum(np.uint32(w) * levels_vector for w in weights).astype(np.uint32)
    mean = dequantize_mean(weighted_sum, total_weight=sum(weights), clipping_range=clipping_range, levels=levels)

    record = check_aggregate_norm(
        [mean],
        bound=bound,
        max_quantization_error=max_quantization_error(clipping_range=clipping_range, levels=levels),
        server_round=1,
    )
    over = record["aggregate_update_norm"] - bound
    # The honest mean really lands over the bound, by nearly the whole quantization allowance ...
    assert over > 0.99 * np.sqrt(size) * clipping_range / levels
    # ... and the derived tolerance still accepts it.
    assert "aggregate_rejected" not in record
