"""apply_drift: each knob moves the image statistics the intended way; deterministic for a given rng."""

from __future__ import annotations

import numpy as np
import pytest

from fedmed.config import SiteDrift
from fedmed.data import apply_drift
from fedmed.data.synthetic.phantoms import enhancement_phantom


def phantom(shape: tuple[int, ...] = (48, 48), seed: int = 0) -> np.ndarray:
    return enhancement_phantom(shape, rng=np.random.default_rng(seed))


def drifted(image: np.ndarray, seed: int = 0, **knobs: object) -> np.ndarray:
    drift = SiteDrift(name="s", **knobs)  # type: ignore[arg-type]
    return apply_drift(image, drift=drift, rng=np.random.default_rng(seed))


def edge_energy(image: np.ndarray) -> float:
    return float(sum(np.mean(np.abs(np.diff(image, axis=axis))) for axis in range(image.ndim)))


@pytest.mark.parametrize("shape", [(48, 48), (24, 24, 24)])
def test_no_drift_is_the_identity_and_drift_is_deterministic(shape: tuple[int, ...]) -> None:
    image = phantom(shape)
    np.testing.assert_allclose(drifted(image), image, rtol=1e-6)
    knobs = {"noise_std": 0.05, "bias_field": 0.3, "gamma": 1.4, "blur_sigma": 0.7, "downsample": 2}
    first, again = drifted(image, seed=4, **knobs), drifted(image, seed=4, **knobs)
    assert first.dtype == np.float32 and first.shape == image.shape
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, drifted(image, seed=5, **knobs))


@pytest.mark.parametrize("shape", [(48, 48), (24, 24, 24)])
def test_lower_resolution_and_blur_remove_detail(shape: tuple[int, ...]) -> None:
    image = phantom(shape)
    energies = [edge_energy(drifted(image, downsample=factor)) for factor in (1, 2, 4)]
    assert energies[0] > energies[1] > energies[2]
    blurred = [edge_energy(drifted(image, blur_sigma=sigma)) for sigma in (0.0, 0.8, 2.0)]
    assert blurred[0] > blurred[1] > blurred[2]
    # 48 and 24 are not all multiples of 3: the image still comes back on its own grid.
    assert drifted(image, downsample=3).shape == image.shape
    assert abs(float(drifted(image, downsample=2).mean()) - float(image.mean())) < 0.01


def test_bias_field_is_smooth_and_spans_its_amplitude() -> None:
    flat = np.full((32, 32, 32), 2.0, dtype=np.float32)
    field = drifted(flat, seed=1, bias_field=0.3) / 2.0
    assert field.min() == pytest.approx(0.7, abs=1e-5) and field.max() == pytest.approx(1.3, abs=1e-5)
    assert np.max(np.abs(np.diff(field, axis=0))) < 0.1  # low frequency: no jumps between neighbours
    weak = drifted(flat, seed=1, bias_field=0.1)
    assert float(weak.std()) < float(drifted(flat, seed=1, bias_field=0.3).std())
    assert not np.allclose(field, drifted(flat, seed=2, bias_field=0.3) / 2.0)


def test_gamma_bends_intensities_between_fixed_extremes() -> None:
    image = phantom()
    unit = (image - image.min()) / (image.max() - image.min())
    for gamma, darker in ((1.8, True), (0.6, False)):
        out = drifted(image, gamma=gamma)
        assert out.min() == pytest.approx(image.min(), abs=1e-5) and out.max() == pytest.approx(image.max(), abs=1e-5)
        out_unit = (out - out.min()) / (out.max() - out.min())
        assert (float(out_unit.mean()) < float(unit.mean())) == darker


def test_scale_and_offset_are_exact() -> None:
    image = phantom()
    out = drifted(image, intensity_scale=2.5, intensity_offset=-0.4)
    np.testing.assert_allclose(out, image * 2.5 - 0.4, rtol=1e-5, atol=1e-5)


def test_noise_std_is_relative_to_the_intensity_range() -> None:
    image = phantom((96, 96)) * 100.0
    span = float(image.max() - image.min())
    noise = drifted(image, noise_std=0.05) - image
    assert float(noise.std()) == pytest.approx(0.05 * span, rel=0.05)
    assert abs(float(noise.mean())) < 0.01 * span


def test_channel_axis_is_refused() -> None:
    with pytest.raises(ValueError, match="without channel axis"):
        drifted(np.zeros((1, 8, 8, 8), dtype=np.float32))
