"""Site-level intensity modes at native resolution: statistics streamed over real NIfTI volumes one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import save_nifti

from fedmed.config import run_config_from_dict
from fedmed.data.normalization import average_landmarks, fit_scan_stats, foreground_mask, normalize_scan_sites
from fedmed.data.normalization.stream import StreamedHistogram
from fedmed.data.scan_site import open_scan_site
from fedmed.site.normalization import STATE_FILE, NormalizationStateError, SiteNormalization

SHAPES = [(14, 12, 10), (10, 16, 9), (12, 12, 12)]  # training cases; a fourth, 11³, is the validation case


def _volume(seed: int, shape: tuple[int, ...], *, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two modalities (a bright blob on a dark background; its inverse) and the blob's label."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij")
    label = (np.sqrt(sum(grid**2 for grid in grids)) < 0.6).astype(np.uint8)
    blob = label.astype(np.float64)
    first = scale * (20 + 80 * blob + rng.gamma(4.0, 3.0, shape))
    second = scale * (300 - 120 * blob + rng.normal(0, 9.0, shape))
    return first.astype(np.float32), second.astype(np.float32), label


def _write_site(root: Path, *, scale: float = 1.0, seed: int = 0) -> Path:
    entries = []
    for number, shape in enumerate([*SHAPES, (11, 11, 11)]):
        first, second, label = _volume(seed + number, shape, scale=scale)
        names = [f"images/c{number}_{modality}.nii.gz" for modality in ("t1", "t2")]
        save_nifti(root / names[0], first)
        save_nifti(root / names[1], second)
        save_nifti(root / f"images/c{number}_label.nii.gz", label)
        entries.append({"image": [f"./{name}" for name in names], "label": f"./images/c{number}_label.nii.gz"})
    manifest = {
        "name": root.name,
        "modality": {"0": "T1", "1": "T2"},
        "labels": {"0": "background", "1": "blob"},
        "training": entries[:3],
        "validation": entries[3:],
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root


def _config(tmp_path: Path, site: Path, *, intensity: str, cache: str = "none", **normalization: object) -> object:
    return run_config_from_dict(
        {
            "name": "scan-normalization",
            "output_dir": str(tmp_path / "runs"),
            # Native spacing and storage (RAS, 1 mm): resampled volumes are the files' voxels (golden values).
            "task": {"kind": "segmentation", "spatial_dims": 3, "spacing": [1.0, 1.0, 1.0], "intensity": intensity},
            "model": {"channels": [4, 8]},
            "train": {"rounds": 1, "batch_size": 2, "patch_size": [8, 8, 8], "augment": False},
            "data": {"cache": cache},
            "normalization": normalization,
            "sites": [{"name": site.name, "path": str(site)}],
        },
        base=tmp_path,
    )


def _raw_channels(site: Path) -> list[list[np.ndarray]]:
    """Per training case, its channels as the files hold them."""
    import nibabel as nib

    manifest = json.loads((site / "dataset.json").read_text())
    return [[np.asarray(nib.load(site / name).dataobj) for name in entry["image"]] for entry in manifest["training"]]


def _foreground(channel: np.ndarray, rule: str) -> np.ndarray:
    mask = foreground_mask(torch.from_numpy(channel), rule=rule).numpy()
    return channel.astype(np.float64)[mask]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return _write_site(tmp_path / "site-a")


def test_streamed_volumes_are_the_files_voxels(site: Path, tmp_path: Path) -> None:
    scan = open_scan_site(site, config=_config(tmp_path, site, intensity="site_zscore"), cache_dir=None)
    for streamed, raw in zip(scan.training_volumes(), _raw_channels(site), strict=True):
        assert np.allclose(streamed.numpy(), np.stack(raw), atol=1e-4)


@pytest.mark.parametrize("rule", ["mean", "nonzero"])
def test_streamed_zscore_equals_the_concatenated_foreground(site: Path, tmp_path: Path, rule: str) -> None:
    config = _config(tmp_path, site, intensity="site_zscore", foreground=rule)
    scan = open_scan_site(site, config=config, cache_dir=None)
    stats, _ = fit_scan_stats(scan.training_volumes(), method="site_zscore", settings=config.normalization)
    raw = _raw_channels(site)
    assert stats.num_images == 3 and len(stats.channels) == 2
    for channel, fitted in enumerate(stats.channels):
        pooled = np.concatenate([_foreground(case[channel], rule) for case in raw])
        assert fitted.values["mean"] == pytest.approx(pooled.mean(), abs=1e-6, rel=1e-9)
        assert fitted.values["std"] == pytest.approx(pooled.std(), abs=1e-6, rel=1e-9)


def test_streamed_percentiles_are_within_one_histogram_bin(site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, site, intensity="site_percentile", percentiles=(2.0, 98.0))
    scan = open_scan_site(site, config=config, cache_dir=None)
    stats, shared = fit_scan_stats(scan.training_volumes(), method="site_percentile", settings=config.normalization)
    for channel, fitted in enumerate(stats.channels):
        pooled = np.concatenate([_foreground(case[channel], "mean") for case in _raw_channels(site)])
        low, high = np.percentile(pooled, [2.0, 98.0])
        bin_width = 2 * (pooled.max() - pooled.min()) / (1 << 16)  # widening leaves at most twice the tightest bin
        assert abs(fitted.values["low"] - low) <= bin_width
        assert abs(fitted.values["high"] - high) <= bin_width
    after = shared["after"]
    assert (after["low"], after["high"]) == (0.0, 1.0) and sum(after["counts"]) > 0


def test_streamed_nyul_landmarks_are_the_mean_of_each_volumes_own(site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, site, intensity="nyul")
    scan = open_scan_site(site, config=config, cache_dir=None)
    stats, _ = fit_scan_stats(scan.training_volumes(), method="nyul", settings=config.normalization)
    marks = config.normalization.landmarks
    for channel, fitted in enumerate(stats.channels):
        expected = []
        for case in _raw_channels(site):
            own = np.percentile(_foreground(case[channel], "mean"), marks)
            expected.append((own - own[0]) / (own[-1] - own[0]))
        assert np.allclose(fitted.values["landmarks"], np.mean(expected, axis=0), atol=1e-9)
    assert stats.landmarks == [*stats.channels[0].values["landmarks"], *stats.channels[1].values["landmarks"]]


def test_a_histogram_that_widens_keeps_every_count_and_its_percentiles() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.normal(5, 1, 4000), rng.normal(-300, 20, 3000), rng.uniform(900, 1000, 500), np.full(10, 7.0)]
    histogram = StreamedHistogram()
    for part in parts:
        histogram.add(part)
    pooled = np.concatenate(parts)
    assert histogram.total == pooled.size
    qs = [0.5, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9]
    assert np.allclose(histogram.percentiles(qs), np.percentile(pooled, qs), atol=histogram.width)
    assert histogram.width <= 2 * (pooled.max() - pooled.min()) / histogram.bins


def test_average_landmarks_keeps_each_channel_in_order_on_its_own() -> None:
    first = [0.0, 0.4, 1.0, 0.0, 0.7, 1.0]
    second = [0.0, 0.6, 1.0, 0.0, 0.5, 1.0]
    averaged = average_landmarks([(first, 1), (second, 3)], block=3)
    assert averaged == pytest.approx([0.0, 0.55, 1.0, 0.0, 0.55, 1.0])
    with pytest.raises(ValueError, match="whole number of channels"):
        average_landmarks([([0.0, 0.5, 1.0, 0.2], 1)], block=3)


def test_site_zscore_normalizes_patches_and_validation_volumes_per_channel(site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, site, intensity="site_zscore")
    scan = open_scan_site(site, config=config, cache_dir=None)
    with pytest.raises(RuntimeError) as refused:  # MONAI names the step that failed, with our reason as the cause
        scan.train[0]
    assert "needs the site's statistics" in str(refused.value.__cause__)
    stats, _ = fit_scan_stats(scan.training_volumes(), method="site_zscore", settings=config.normalization)
    scan.use_intensity(stats)
    pooled = [[], []]
    for raw in scan.training_volumes():
        normalized = scan.intensity({"image": raw})["image"]
        for channel in range(2):
            mask = foreground_mask(raw[channel], rule="mean")
            pooled[channel].append(normalized[channel][mask].double().numpy())
    for values in pooled:
        merged = np.concatenate(values)
        assert merged.mean() == pytest.approx(0.0, abs=1e-5) and merged.std() == pytest.approx(1.0, abs=1e-5)
    patch = scan.train[0]["image"]
    assert tuple(patch.shape) == (2, 8, 8, 8) and float(patch.abs().max()) < 20
    volume = scan.val[0]["image"]
    assert hasattr(volume, "applied_operations")  # still invertible onto the source grid
    mean, std = stats.channels[0].values["mean"], stats.channels[0].values["std"]
    raw_val = _volume(3, (11, 11, 11), scale=1.0)[0]
    assert np.allclose(volume[0].numpy(), (raw_val - mean) / std, atol=1e-4)


def test_disk_cache_serves_the_fit_and_training_reads_the_same_files(site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, site, intensity="site_zscore", cache="disk")
    cache = tmp_path / "cache"
    scan = open_scan_site(site, config=config, cache_dir=cache)
    stats, _ = fit_scan_stats(scan.training_volumes(), method="site_zscore", settings=config.normalization)
    cached = sorted(cache.rglob("*.pt"))
    assert len(cached) == 3
    stamps = [path.stat().st_mtime_ns for path in cached]
    scan.use_intensity(stats)
    for index in range(len(scan.train)):
        scan.train[index]
    assert sorted(cache.rglob("*.pt")) == cached  # training preprocessed nothing again
    assert [path.stat().st_mtime_ns for path in cached] == stamps
    # What the cache holds is in scanner units: refitted statistics apply without preprocessing again.
    first = torch.load(cached[0], weights_only=True)["image"]
    assert float(first.max()) > 50


def test_the_site_keeps_its_statistics_and_reuses_them_for_the_same_cases(site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, site, intensity="site_zscore")
    state = tmp_path / "state"
    normalization = SiteNormalization(site="site-a", state_dir=state, config=config)
    scan = open_scan_site(site, config=config, cache_dir=None)
    shared = normalization.describe_scans(scan)
    assert shared["num_images"] == 3 and set(shared) == {"num_images", "before", "after"}
    kept = json.loads((state / STATE_FILE).read_text())
    assert kept["method"] == "site_zscore" and kept["scan"]["key"] == scan.intensity_key
    # A restart on the same cases reads no volume: the files could be gone.
    for path in (site / "images").glob("c[0-2]_*"):
        path.unlink()
    restarted = SiteNormalization(site="site-a", state_dir=state, config=config)
    restarted.use_on_scans(scan)
    assert scan.intensity is not None and scan.intensity.stats is not None
    assert scan.intensity.stats.to_json() == kept["scan"]["stats"]


def test_nyul_without_the_federations_landmarks_is_refused_with_the_fix(site: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, site, intensity="nyul")
    normalization = SiteNormalization(site="site-a", state_dir=tmp_path / "state", config=config)
    scan = open_scan_site(site, config=config, cache_dir=None)
    shared = normalization.describe_scans(scan)
    assert len(shared["landmarks"]) == 2 * len(config.normalization.landmarks)
    with pytest.raises(NormalizationStateError, match="no federation landmarks"):
        normalization.use_on_scans(scan)
    normalization.set_standard_landmarks(average_landmarks([(shared["landmarks"], 3)], block=11))
    normalization.use_on_scans(scan)
    assert tuple(scan.train[0]["image"].shape) == (2, 8, 8, 8)


def test_scan_geometry_accepts_the_site_level_modes() -> None:
    for mode in ("site_zscore", "site_percentile", "nyul"):
        run = run_config_from_dict(
            {
                "name": "x",
                "task": {"kind": "segmentation", "spatial_dims": 3, "spacing": [1, 1, 1], "intensity": mode},
                "train": {"patch_size": [8, 8, 8]},
                "sites": [{"name": "a", "path": "a"}],
            },
            base=Path("/tmp"),
        )
        assert run.task.intensity == mode


@pytest.mark.parametrize("mode", ["site_zscore", "site_percentile", "nyul"])
def test_a_scanner_with_three_times_the_gain_gives_the_same_model_inputs(tmp_path: Path, mode: str) -> None:
    config = _config(tmp_path, tmp_path / "site-a", intensity=mode)
    scans = [
        open_scan_site(_write_site(tmp_path / name, scale=scale), config=config, cache_dir=None)
        for name, scale in (("site-a", 1.0), ("site-b", 3.0))
    ]
    normalize_scan_sites(scans, method=mode, settings=config.normalization)
    inputs = [[scan.intensity({"image": raw})["image"] for raw in scan.training_volumes()] for scan in scans]
    raw_a, raw_b = next(scans[0].training_volumes()), next(scans[1].training_volumes())
    assert torch.allclose(raw_b, 3 * raw_a, rtol=1e-5)
    for first, second in zip(*inputs, strict=True):
        assert torch.allclose(first, second, atol=1e-4)
