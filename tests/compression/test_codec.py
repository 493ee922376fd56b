"""The update codec: golden values, its error bounds, unbiased stochastic rounding, a decoder that trusts nothing."""

from __future__ import annotations

import numpy as np
import pytest

from fedmed.compression import CompressionError, UpdateCodec, decode_groups, encode_groups

UPDATE = np.array([0.5, -0.25, 0.1, 0.0, -1.0, 0.3, 0.02, -0.07], dtype=np.float32)


def test_golden_values() -> None:
    """Fixed by hand once (numpy's PCG64 draws are stable across versions): any change to the wire format shows."""
    stochastic = UpdateCodec(bits=8, chunk=4, stochastic=True).encode(UPDATE, rng=np.random.default_rng(0))
    assert stochastic["values"].dtype == np.int8
    assert stochastic["values"].tolist() == [127, -63, 25, 0, -127, 38, 2, -9]
    assert stochastic["scales"].tolist() == pytest.approx([0.5 / 127, 1.0 / 127], rel=1e-7)

    nearest = UpdateCodec(bits=16, chunk=8, stochastic=False).encode(UPDATE)
    assert nearest["values"].dtype == np.int16
    assert nearest["values"].tolist() == [16384, -8192, 3277, 0, -32767, 9830, 655, -2294]

    sparse = UpdateCodec(bits=8, top_k=0.25, chunk=4, stochastic=False).encode(UPDATE)
    assert sparse["indices"].tolist() == [0, 4] and sparse["values"].tolist() == [64, -127]
    decoded = UpdateCodec(bits=8, top_k=0.25, chunk=4).decode(sparse, size=8)
    assert decoded.tolist() == pytest.approx([64 / 127, 0, 0, 0, -1.0, 0, 0, 0], rel=1e-6)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("stochastic", [True, False])
def test_every_value_lies_within_one_step_of_its_chunks_scale(bits: int, stochastic: bool) -> None:
    rng = np.random.default_rng(1)
    update = (rng.standard_normal(5000) * np.repeat([1e-4, 1.0, 30.0], [2000, 2000, 1000])).astype(np.float32)
    codec = UpdateCodec(bits=bits, chunk=512, stochastic=stochastic)
    parts = codec.encode(update, rng=rng)
    decoded = codec.decode(parts, size=update.size)
    step = np.repeat(parts["scales"], 512)[: update.size]  # a ragged last chunk of 392 values
    error = np.abs(decoded - update)
    # float32 holds a 16-bit level to about 2^-9 of a step
    assert np.all(error <= step * ((1.0 if stochastic else 0.5) + 2e-3))
    assert parts["scales"].size == 10


def test_stochastic_rounding_is_unbiased() -> None:
    codec = UpdateCodec(bits=8, chunk=8, stochastic=True)
    rng = np.random.default_rng(2)
    mean = np.mean([codec.decode(codec.encode(UPDATE, rng=rng), size=8) for _ in range(4000)], axis=0)
    step = 1.0 / 127
    assert np.abs(mean - UPDATE).max() < 0.03 * step  # nearest rounding is off by up to half a step for good


def test_top_k_sends_the_largest_values_and_their_indices() -> None:
    update = np.arange(-50, 50, dtype=np.float32)
    codec = UpdateCodec(top_k=0.05)
    parts = codec.encode(update)
    assert codec.kept(100) == 5 and sorted(np.abs(update[parts["indices"]])) == [48, 48, 49, 49, 50]
    decoded = codec.decode(parts, size=100)
    assert np.count_nonzero(decoded) == 5 and np.array_equal(decoded[parts["indices"]], update[parts["indices"]])


def test_groups_travel_under_their_names() -> None:
    codec = UpdateCodec(bits=8, top_k=0.5, chunk=16)
    updates = {"float32": UPDATE, "float64": UPDATE[:4].astype(np.float64)}
    parts = encode_groups(codec, updates, rng=np.random.default_rng(0))
    assert sorted(parts) == [f"{g}.{p}" for g in ("float32", "float64") for p in ("indices", "scales", "values")]
    decoded = decode_groups(codec, parts, sizes={"float32": 8, "float64": 4})
    assert decoded["float64"].shape == (4,)
    with pytest.raises(CompressionError, match="groups this model lacks"):
        decode_groups(codec, parts, sizes={"float32": 8})


def test_a_diverged_update_is_not_encoded() -> None:
    with pytest.raises(CompressionError, match="1 NaN or infinite"):
        UpdateCodec(bits=8).encode(np.array([1.0, np.nan], dtype=np.float32), rng=np.random.default_rng(0))


def _tampered(change: str) -> dict[str, np.ndarray]:
    parts = UpdateCodec(bits=8, top_k=0.5, chunk=4, stochastic=False).encode(UPDATE)
    if change == "dtype":
        parts["values"] = parts["values"].astype(np.int16)
    elif change == "count":
        parts["values"] = parts["values"][:-1]
    elif change == "index out of range":
        parts["indices"] = parts["indices"].copy()
        parts["indices"][-1] = 8
    elif change == "repeated index":
        parts["indices"] = np.array([0, 0, 4, 5], dtype=np.uint32)
    elif change == "negative scale":
        parts["scales"] = -parts["scales"]
    elif change == "nan scale":
        parts["scales"] = np.array([np.nan], dtype=np.float32)
    elif change == "beyond L":
        parts["values"] = np.array([-128, 1, 2, 3], dtype=np.int8)
    elif change == "extra part":
        parts["hidden"] = np.zeros(3, dtype=np.float32)
    elif change == "missing part":
        del parts["scales"]
    return parts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("dtype", "values of int16"),
        ("count", "3 values"),
        ("index out of range", "below 8"),
        ("repeated index", "distinct"),
        ("negative scale", "negative"),
        ("nan scale", "NaN"),
        ("beyond L", r"outside \[-127, 127\]"),
        ("extra part", "another \\[compression\\] setting"),
        ("missing part", "another \\[compression\\] setting"),
    ],
)
def test_the_decoder_refuses_what_does_not_fit(change: str, message: str) -> None:
    with pytest.raises(CompressionError, match=message):
        UpdateCodec(bits=8, top_k=0.5, chunk=4).decode(_tampered(change), size=8)
