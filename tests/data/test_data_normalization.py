"""Site-level intensity normalization: each mode removes a site's intensity shift; federated Nyúl agrees."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedmed.config import NormalizationConfig
from fedmed.data import SiteData
from fedmed.data.normalization import (
    SITE_LEVEL_MODES,
    SiteIntensityStats,
    average_landmarks,
    fit_site_stats,
    foreground_mask,
    intensity_histogram,
    normalize_image,
    normalize_site,
)
from fedmed.data.normalization import fit as normalization_fit

SETTINGS = NormalizationConfig()


def phantom(seed: int, shape: tuple[int, ...] = (32, 32)) -> torch.Tensor:
    """Zero background around a blob whose intensities vary smoothly in [0.4, 1.1] with noise.

    The blob is small and its darkest voxels well above 0, so the "mean" rule finds the same foreground
    after the monotone scanner maps the tests apply.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij")
    radius = np.sqrt(sum(grid**2 for grid in grids))
    inside = radius < 0.55 + 0.1 * rng.random()
    texture = 0.6 + 0.3 * np.cos(3 * grids[0] + rng.random() * 3) * np.sin(2 * grids[-1]) + 0.05 * rng.random()
    values = np.clip(texture + 0.05 * rng.standard_normal(shape), 0.4, 1.1)
    return torch.from_numpy(np.where(inside, values, 0.0)[None].astype(np.float32))


def site_images(count: int = 6, shape: tuple[int, ...] = (32, 32), seed: int = 0) -> list[torch.Tensor]:
    return [phantom(seed + index, shape) for index in range(count)]


def fg_values(images: list[torch.Tensor], masks: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([image[mask].double().numpy() for image, mask in zip(images, masks)])


def normalized(images: list[torch.Tensor], **kwargs: object) -> list[torch.Tensor]:
    return [normalize_image(image, settings=SETTINGS, **kwargs) for image in images]  # type: ignore[arg-type]


# --- foreground rules ---------------------------------------------------------------------------------


def test_foreground_rules() -> None:
    image = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    assert foreground_mask(image, rule="mean").tolist() == [[False, False, False, True]]
    assert foreground_mask(image, rule="nonzero").tolist() == [[False, False, True, True]]
    assert foreground_mask(image, rule="all").all()
    mask = foreground_mask(image, rule="mean")
    assert mask.dtype == torch.bool and mask.shape == image.shape


@pytest.mark.parametrize("rule", ["mean", "nonzero"])
def test_empty_foreground_falls_back_to_every_voxel(rule: str) -> None:
    assert foreground_mask(torch.zeros(1, 4, 4), rule=rule).all()


def test_unknown_foreground_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown foreground rule 'otsu'"):
        foreground_mask(torch.zeros(1, 4, 4), rule="otsu")


# --- site_zscore, site_percentile, ct_window ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_site_zscore_standardizes_the_pooled_foreground(shape: tuple[int, ...]) -> None:
    images = site_images(shape=shape)
    stats = fit_site_stats(images, method="site_zscore", settings=SETTINGS)
    assert stats.num_images == len(images)
    out = normalized(images, method="site_zscore", stats=stats, standard_landmarks=None)
    masks = [foreground_mask(image, rule="mean") for image in images]
    pooled = fg_values(out, masks)
    assert abs(pooled.mean()) < 1e-4 and abs(pooled.std() - 1) < 1e-4
    assert all(o.dtype == torch.float32 and o.shape == i.shape for o, i in zip(out, images))


def test_site_zscore_removes_a_sites_scale_and_offset() -> None:
    site_a = site_images()
    site_b = [3 * image + 50 for image in site_a]
    out_a, out_b = (
        normalized(
            site,
            method="site_zscore",
            stats=fit_site_stats(site, method="site_zscore", settings=SETTINGS),
            standard_landmarks=None,
        )
        for site in (site_a, site_b)
    )
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_site_zscore_keeps_contrast_between_a_sites_images() -> None:
    # Unlike per-image z-score, a brighter image stays brighter after site-level normalization.
    dim, bright = phantom(0), 2 * phantom(1)
    stats = fit_site_stats([dim, bright], method="site_zscore", settings=SETTINGS)
    out_dim, out_bright = normalized([dim, bright], method="site_zscore", stats=stats, standard_landmarks=None)
    assert out_bright.max() > out_dim.max() + 0.5


def test_site_zscore_refuses_a_constant_site() -> None:
    with pytest.raises(ValueError, match="standard deviation is 0"):
        fit_site_stats([torch.full((1, 8, 8), 7.0)] * 3, method="site_zscore", settings=SETTINGS)


def test_site_percentile_maps_the_chosen_percentiles_to_the_unit_range() -> None:
    images = site_images(count=8)
    stats = fit_site_stats(images, method="site_percentile", settings=SETTINGS)
    masks = [foreground_mask(image, rule="mean") for image in images]
    raw = fg_values(images, masks)
    assert stats.values["low"] == pytest.approx(np.percentile(raw, 1))
    assert stats.values["high"] == pytest.approx(np.percentile(raw, 99))
    pooled = fg_values(normalized(images, method="site_percentile", stats=stats, standard_landmarks=None), masks)
    assert pooled.min() >= 0 and pooled.max() <= 1
    # About 1% of voxels lie beyond each end; the phantom's dark floor (many voxels at 0.4) adds ties at 0.
    assert 0.01 <= np.mean(pooled <= 0) < 0.06 and 0.005 < np.mean(pooled >= 1) < 0.03


def test_site_percentile_subsample_of_a_large_site_stays_accurate(monkeypatch: pytest.MonkeyPatch) -> None:
    images = site_images(count=8)
    exact = fit_site_stats(images, method="site_percentile", settings=SETTINGS)
    monkeypatch.setattr(normalization_fit, "MAX_PERCENTILE_VOXELS", 1000)  # where fitting reads it
    sampled = fit_site_stats(images, method="site_percentile", settings=SETTINGS)
    assert sampled.values["low"] == pytest.approx(exact.values["low"], abs=0.03)
    assert sampled.values["high"] == pytest.approx(exact.values["high"], abs=0.03)
    assert fit_site_stats(images, method="site_percentile", settings=SETTINGS) == sampled


def test_ct_window_on_known_hounsfield_units() -> None:
    image = torch.tensor([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    stats = fit_site_stats([image], method="ct_window", settings=SETTINGS)
    assert stats.values == {}
    out = normalize_image(image, method="ct_window", stats=None, standard_landmarks=None, settings=SETTINGS)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


@pytest.mark.parametrize("method", ["site_zscore", "site_percentile"])
def test_missing_or_mismatched_stats_say_to_fit_first(method: str) -> None:
    image = phantom(0)
    with pytest.raises(ValueError, match="must fit its statistics first"):
        normalize_image(image, method=method, stats=None, standard_landmarks=None, settings=SETTINGS)
    other = "site_percentile" if method == "site_zscore" else "site_zscore"
    wrong = fit_site_stats([image], method=other, settings=SETTINGS)
    with pytest.raises(ValueError, match=f"fitted for {other}"):
        normalize_image(image, method=method, stats=wrong, standard_landmarks=None, settings=SETTINGS)


def test_fit_refuses_no_images_unknown_modes_and_non_finite_images() -> None:
    with pytest.raises(ValueError, match="no training images"):
        fit_site_stats([], method="site_zscore", settings=SETTINGS)
    with pytest.raises(ValueError, match="unknown site-level intensity mode"):
        fit_site_stats([phantom(0)], method="zscore", settings=SETTINGS)
    broken = phantom(1).clone()
    broken[0, 16, 16] = float("nan")
    with pytest.raises(ValueError, match="training image 1 has NaN"):
        fit_site_stats([phantom(0), broken], method="nyul", settings=SETTINGS)


# --- nyul ---------------------------------------------------------------------------------------------


def own_landmarks(image: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    mask = foreground_mask(image, rule="mean") if mask is None else mask
    values = image[mask].double().numpy()
    return np.percentile(values, SETTINGS.landmarks)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_federated_nyul_brings_differently_mapped_sites_onto_one_scale(shape: tuple[int, ...]) -> None:
    site_a = site_images(count=5, shape=shape, seed=0)
    # A monotone nonlinear scanner difference: gamma, then scale and offset.
    site_b = [200 * image.clamp(min=0) ** 1.8 + 30 for image in site_images(count=3, shape=shape, seed=10)]
    stats_a = fit_site_stats(site_a, method="nyul", settings=SETTINGS)
    stats_b = fit_site_stats(site_b, method="nyul", settings=SETTINGS)
    for stats in (stats_a, stats_b):
        marks = stats.values["landmarks"]
        assert isinstance(marks, list) and marks[0] == 0 and marks[-1] == 1
    pairs = [(stats.values["landmarks"], stats.num_images) for stats in (stats_a, stats_b)]
    standard = average_landmarks(pairs)  # type: ignore[arg-type]
    for image in site_a + site_b:
        out = normalize_image(image, method="nyul", stats=None, standard_landmarks=standard, settings=SETTINGS)
        assert torch.isfinite(out).all() and out.dtype == torch.float32
        # On the raw image's foreground: the mapping moves the image mean, and with it the "mean" rule's mask.
        np.testing.assert_allclose(own_landmarks(out, foreground_mask(image, rule="mean")), standard, atol=2e-3)
    # Before mapping the sites' landmarks were far apart; after, an image and its scanner-mapped twin agree.
    twin_a = phantom(10, shape)
    twin_b = 200 * twin_a.clamp(min=0) ** 1.8 + 30
    out_a, out_b = (
        normalize_image(t, method="nyul", stats=None, standard_landmarks=standard, settings=SETTINGS)
        for t in (twin_a, twin_b)
    )
    mask = foreground_mask(twin_a, rule="mean")
    assert float((out_a[mask] - out_b[mask]).abs().mean()) < 0.02


def test_nyul_extrapolates_monotonically_beyond_the_end_landmarks() -> None:
    image = torch.linspace(-5, 10, 2001).reshape(1, -1)
    standard = np.linspace(0, 1, len(SETTINGS.landmarks)) ** 1.5
    out = normalize_image(image, method="nyul", stats=None, standard_landmarks=standard.tolist(), settings=SETTINGS)
    values = out.flatten().numpy()
    assert np.all(np.diff(values) >= -1e-6)
    marks = own_landmarks(image)
    assert values[0] < standard[0] and values[-1] > standard[-1]
    below = image.flatten().numpy() < marks[0]
    # Beyond the first landmark the first segment's slope continues.
    slope = (standard[1] - standard[0]) / (marks[1] - marks[0])
    np.testing.assert_allclose(
        values[below], standard[0] + (image.flatten().numpy()[below] - marks[0]) * slope, atol=1e-5
    )


@pytest.mark.parametrize(
    "image",
    [
        # Most of the foreground at one value: many landmarks coincide.
        torch.tensor([[0.0] * 50 + [5.0] * 80 + [6.0, 7.0, 8.0]]),
        # Flat foreground: every landmark is the same value.
        torch.tensor([[0.0] * 50 + [5.0] * 80]),
        torch.full((1, 8, 8), 3.0),
    ],
)
def test_nyul_survives_repeated_landmarks(image: torch.Tensor) -> None:
    standard = np.linspace(0, 1, len(SETTINGS.landmarks)).tolist()
    out = normalize_image(image, method="nyul", stats=None, standard_landmarks=standard, settings=SETTINGS)
    assert torch.isfinite(out).all()
    order = torch.argsort(image.flatten())
    assert np.all(np.diff(out.flatten()[order].numpy()) >= -1e-6)


def test_nyul_fit_leaves_out_flat_images_and_refuses_a_flat_site() -> None:
    flat = torch.full((1, 8, 8), 2.0)
    stats = fit_site_stats([phantom(0), flat], method="nyul", settings=SETTINGS)
    assert stats.num_images == 1
    with pytest.raises(ValueError, match="flat foreground"):
        fit_site_stats([flat, flat], method="nyul", settings=SETTINGS)


def test_nyul_without_the_federations_landmarks_says_so() -> None:
    with pytest.raises(ValueError, match="standard landmarks, but they are missing"):
        normalize_image(phantom(0), method="nyul", stats=None, standard_landmarks=None, settings=SETTINGS)
    with pytest.raises(ValueError, match="has 11"):
        normalize_image(phantom(0), method="nyul", stats=None, standard_landmarks=[0, 0.5, 1], settings=SETTINGS)


def test_average_landmarks_weights_by_image_count() -> None:
    average = average_landmarks([([0.0, 0.2, 1.0], 3), ([0.0, 0.6, 1.0], 1)])
    assert average == pytest.approx([0.0, 0.3, 1.0])
    assert average_landmarks([([0.0, 0.2, 1.0], 0), ([0.0, 0.6, 1.0], 2)]) == pytest.approx([0.0, 0.6, 1.0])


@pytest.mark.parametrize(
    ("sites", "reason"),
    [
        ([], "no site sent any"),
        ([([0.0, 0.5, 1.0], 2), ([0.0, 1.0], 2)], "same normalization.landmarks"),
        ([([0.0, float("nan"), 1.0], 2)], "NaN or infinite"),
        ([([0.0, 0.5, 1.0], 0), ([0.0, 0.4, 1.0], 0)], "positive total"),
        ([([0.0, 0.5, 1.0], -1), ([0.0, 0.4, 1.0], 3)], "non-negative"),
    ],
)
def test_average_landmarks_refusals(sites: list, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        average_landmarks(sites)


# --- stats json -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SITE_LEVEL_MODES)
def test_stats_json_round_trip(method: str) -> None:
    stats = fit_site_stats(site_images(count=3), method=method, settings=SETTINGS)
    again = SiteIntensityStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert again == stats


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([1, 2], "must be an object with keys"),
        ({"method": "site_zscore", "values": {"mean": 0.0}}, "must be an object with keys"),
        ({"method": "minmax", "values": {}, "num_images": 1}, "unknown method 'minmax'"),
        ({"method": "site_zscore", "values": {"mean": 0.0}, "num_images": 1}, "need exactly the values"),
        ({"method": "site_zscore", "values": {"mean": "0", "std": 1.0}, "num_images": 1}, "must be a number"),
        ({"method": "site_zscore", "values": {"mean": 0.0, "std": 0.0}, "num_images": 1}, "std must be positive"),
        ({"method": "site_zscore", "values": {"mean": math.nan, "std": 1.0}, "num_images": 1}, "not finite"),
        ({"method": "site_zscore", "values": {"mean": 0.0, "std": 1.0}, "num_images": -2}, "non-negative integer"),
        ({"method": "site_percentile", "values": {"low": 2.0, "high": 1.0}, "num_images": 1}, "must exceed low"),
        ({"method": "nyul", "values": {"landmarks": [0.0, 0.7, 0.5, 1.0]}, "num_images": 1}, "non-decreasing"),
        ({"method": "nyul", "values": {"landmarks": 0.5}, "num_images": 1}, "list of at least 3"),
        ({"method": "ct_window", "values": [], "num_images": 1}, "'values' must be an object"),
    ],
)
def test_bad_stats_json_is_refused_with_the_fix(data: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        SiteIntensityStats.from_json(data)  # type: ignore[arg-type]
    assert "fit_site_stats" in str(caught.value)


# --- histograms and normalize_site ---------------------------------------------------------------------


def test_histogram_counts_every_foreground_voxel() -> None:
    images = site_images(count=4)
    histogram = intensity_histogram(images, bins=SETTINGS.histogram_bins, rule="mean")
    masks = [foreground_mask(image, rule="mean") for image in images]
    assert len(histogram["counts"]) == SETTINGS.histogram_bins
    assert sum(histogram["counts"]) == sum(int(mask.sum()) for mask in masks)
    values = fg_values(images, masks)
    assert histogram["low"] == pytest.approx(np.percentile(values, 0.5))
    assert histogram["high"] == pytest.approx(np.percentile(values, 99.5))
    # The tails beyond the range land in the end bins rather than being dropped.
    assert histogram["counts"][0] >= np.sum(values <= histogram["low"])


def test_histogram_before_and_after_counts_the_same_voxels_with_shared_masks() -> None:
    images = site_images(count=4)
    masks = [foreground_mask(image, rule="mean") for image in images]
    stats = fit_site_stats(images, method="site_percentile", settings=SETTINGS)
    after = normalized(images, method="site_percentile", stats=stats, standard_landmarks=None)
    before_hist = intensity_histogram(images, bins=16, rule="mean", masks=masks)
    after_hist = intensity_histogram(after, bins=16, rule="mean", masks=masks)
    assert sum(before_hist["counts"]) == sum(after_hist["counts"]) == sum(int(mask.sum()) for mask in masks)
    assert 0 <= after_hist["low"] < after_hist["high"] <= 1
    with pytest.raises(ValueError, match="one mask per image"):
        intensity_histogram(images, bins=16, rule="mean", masks=masks[:2])


def test_histogram_of_a_constant_site_is_finite() -> None:
    histogram = intensity_histogram([torch.full((1, 4, 4), 2.0)], bins=8, rule="mean")
    assert sum(histogram["counts"]) == 16 and histogram["low"] == histogram["high"] == 2.0


@pytest.mark.parametrize("method", SITE_LEVEL_MODES)
def test_normalize_site_leaves_the_cached_tensors_alone(method: str) -> None:
    train = [{"image": image, "label": torch.tensor(index)} for index, image in enumerate(site_images(count=4))]
    val = [{"image": phantom(99), "label": torch.tensor(1)}]
    data = SiteData(name="alpha", train=train, val=val)
    originals = [sample["image"].clone() for sample in train + val]
    stats = fit_site_stats([sample["image"] for sample in train], method=method, settings=SETTINGS)
    standard = stats.values["landmarks"] if method == "nyul" else None
    assert not isinstance(standard, float)
    out = normalize_site(data, method=method, stats=stats, standard_landmarks=standard, settings=SETTINGS)
    for sample, original in zip(train + val, originals):
        assert torch.equal(sample["image"], original)
    assert out.name == "alpha" and out.num_train == 4 and out.num_val == 1
    assert out.train is not data.train
    for new, old in zip(out.train + out.val, train + val):
        assert new["label"] is old["label"]
        assert new["image"] is not old["image"] and new["image"].shape == old["image"].shape
        assert not torch.equal(new["image"], old["image"])
