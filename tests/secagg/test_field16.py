"""SecAgg+ over a 16-bit field: half the bytes of every masked vector, a sum that cannot wrap by construction, and
exactly the aggregate plain (unmasked) summation of the same quantized updates gives."""

from __future__ import annotations

import numpy as np
import pytest
from test_protocol import MASKED_INPUT, NUM_PARAMS, SHAPES, make_updates, plain_mean, run_round

from fedmed.secagg import SecAggInputError, SecAggServer, SecAggSettings
from fedmed.secagg.encoding import VectorLayout, decode_sum, encode_contribution, flatten_update
from fedmed.secagg.quantize import dequantize_mean

IDS = [11, 22, 33]
FIELD16 = SecAggSettings(field_bits=16, max_total_weight=3, clipping_range=0.5)  # one vote per site


def test_the_bound_every_element_of_the_sum_must_keep() -> None:
    """W * L <= 2^16 - 1 for the largest even L: the weighted sum of levels in [0, L] cannot wrap."""
    for sites in range(2, 200):
        levels = SecAggSettings(field_bits=16, max_total_weight=sites).levels
        assert levels % 2 == 0 and sites * levels <= 2**16 - 1 < sites * (levels + 2)
    assert FIELD16.levels == 21844
    with pytest.raises(SecAggInputError, match="fewer than 2 quantisation levels in a 16-bit sum"):
        SecAggSettings(field_bits=16, max_total_weight=40_000)
    with pytest.raises(SecAggInputError, match="field_bits must be one of"):
        SecAggSettings(field_bits=8)
    with pytest.raises(SecAggInputError, match="weight sum could wrap"):
        SecAggServer(
            node_ids=list(range(1, 40)), shapes=SHAPES, settings=SecAggSettings(field_bits=16, max_total_weight=2000)
        )


def test_the_masked_sum_is_exactly_the_plain_sum_of_the_quantized_updates() -> None:
    updates = make_updates(IDS, seed=4)
    weights = dict.fromkeys(IDS, 1)
    rnd = run_round(IDS, updates, weights, settings=FIELD16)
    vectors = {nid: reply[0] for stage, nid, reply in rnd.replies if stage == MASKED_INPUT}
    assert all(vector.dtype == np.uint16 and vector.nbytes == 2 * (NUM_PARAMS + 2) for vector in vectors.values())
    for nid, vector in vectors.items():  # masked: uniform over the field, unrelated to the site's update
        flat = flatten_update(updates[nid], num_params=NUM_PARAMS).astype(np.float64)
        assert vector.std() > 2**14 and abs(np.corrcoef(vector[:NUM_PARAMS].astype(np.float64), flat)[0, 1]) < 0.05

    # The same updates encoded without masks and summed in the field: the unmasked aggregate must equal it.
    layout = VectorLayout(num_params=NUM_PARAMS, field_bits=16)
    plain = np.zeros(layout.length, dtype=np.uint16)
    for nid in IDS:
        vector, _ = encode_contribution(
            flatten_update(updates[nid], num_params=NUM_PARAMS),
            weight=1,
            extra_counts=None,
            layout=layout,
            clipping_range=0.5,
            levels=FIELD16.levels,
            max_total_weight=3,
            num_sites=3,
        )
        plain += vector
    decoded = decode_sum(plain, layout=layout)
    expected = dequantize_mean(decoded.weighted_sum, total_weight=3, clipping_range=0.5, levels=FIELD16.levels)
    got = np.concatenate([array.reshape(-1) for array in rnd.result.mean_update])
    np.testing.assert_array_equal(got, expected)
    assert rnd.result.total_weight == 3
    error = max(
        float(np.abs(a.astype(np.float64) - b).max())
        for a, b in zip(rnd.result.mean_update, plain_mean(updates, weights, IDS), strict=True)
    )
    assert 0 < error <= FIELD16.max_quantization_error


def test_extra_counts_and_clipped_counts_fit_the_smaller_field() -> None:
    updates = make_updates(IDS, seed=5)
    updates[22][1][:] = 2.0  # 7000 values clipped at one site: far more than a per-site share of 2^16
    rnd = run_round(IDS, updates, dict.fromkeys(IDS, 1), settings=FIELD16, extra={11: [1, -1], 22: [0, 1], 33: [1, 1]})
    assert rnd.result.extra_sums.tolist() == [2, 1]
    assert rnd.result.clipped_values == 7000  # under the per-site cap (2^16 - 1) // 3 = 21845
